r"""The "inconsistent biases" study on CLIP: `python -m baq.study.vlm --config=configs/vlm.py --root=R`.

Per seed (`--seeds`), in ROOT/seed<S>:
  fp32/                 the in-run CLIP's checkpoints (resumed)
  results/<quantizer>.json   its zero-shot and retrieval metrics and cells
  report.json           every quantizer of the seed
and ROOT/summary.json + ROOT/verdicts.png: per (quantizer, group) cell the
change from full precision with the paper's paired t-test, baq's bootstrap
interval and exact McNemar test with Holm's correction across groups, and a
verdict (amplified: the group's zero-shot accuracy fell, or the neutral
queries' MaxSkew@k rose; reduced: the reverse; no change: Holm-adjusted
p >= 0.05); the summary counts how the cells go, per quantizer and over
seeds, which is the paper's inconsistency.

The default data are SYNTHETIC (`baq.data.vlm.synthetic`): lesion images
over six skin types with captions naming the class; zero-shot
classification of the lesion class per skin type, and retrieval skew over
skin types for neutral queries.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app, flags
import numpy as np
from ml_collections import config_flags

from baq import host
from baq.data.text import tokenizer as tok
from baq.data.vlm import synthetic
from baq.fairness import vlm_metrics
from baq.models.clip.model import CLIP
from baq.study import corrections, stats, vlm_quant
from baq.train import experiment, workdir as wd


def load_data(config) -> dict:
  """The image-caption set split into train / test, tokenized."""
  d = config.data
  if d.kind != "synthetic":
    raise ValueError(f"Unknown data.kind {d.kind!r}. Valid: synthetic.")
  data = synthetic.generate(d.seed, d.num_images, image_size=d.image_size)
  texts = list(data.captions) + [p for c in data.class_prompts for p in c] + list(
      data.neutral_queries)
  tk = tok.word_tokenizer(texts)
  ids = tok.special_ids(tk)
  enc = lambda s: tok.encode_batch(tk, list(s), bos_id=ids["bos"], eos_id=ids["eos"],
                                   pad_id=ids["pad"], max_len=d.max_len)[0]
  width = max(enc(texts).shape[1], 2)
  pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1])))
  order = np.random.default_rng(d.seed).permutation(len(data))
  n_test = int(round(d.test_fraction * len(data)))
  test, train = order[:n_test], order[n_test:]
  prompts = pad(enc([p for c in data.class_prompts for p in c])).reshape(
      len(data.class_prompts), len(data.class_prompts[0]), width)
  return dict(data=data, tokenizer=tk, eos=ids["eos"], captions=pad(enc(data.captions)),
              prompts=prompts, queries=pad(enc(data.neutral_queries)), train=train, test=test,
              num_groups=len(data.group_names), width=width)


def metrics(emb: dict, labels, groups, num_groups: int, ks: Sequence[int]) -> dict:
  """Zero-shot per-group accuracy and disparities, and retrieval skew at each k."""
  pred = vlm_metrics.zero_shot_predictions(emb["image"], emb["classes"])
  out = dict(correct=(pred == labels).astype(np.int8),
             zero_shot=vlm_metrics.group_accuracy_disparity(pred, labels, groups, num_groups,
                                                            attribute="skin_type"))
  sim = emb["queries"] @ emb["image"].T
  out["retrieval"] = {str(k): vlm_metrics.retrieval_skew(sim, groups, k, num_groups=num_groups,
                                                         attribute="skin_type") for k in ks}
  return out


def cells(m: dict, m_fp: dict, groups, num_groups: int, config, seed: int) -> dict:
  """The (quantizer, group) cells against full precision, and the skew cells."""
  ch = stats.paired_change(m["correct"], m_fp["correct"], groups, num_groups,
                           num_samples=config.bootstrap, seed=seed)
  mc = [stats.mcnemar_exact(m_fp["correct"][groups == g], m["correct"][groups == g])["p_value"]
        for g in range(num_groups)]
  holm = corrections.adjust(mc, "holm")
  out = {}
  for g in range(num_groups):
    sel = groups == g
    t = vlm_metrics.paired_t(m["correct"][sel], m_fp["correct"][sel])
    out[f"group{g}"] = dict(change=100 * ch["change"][g], low=100 * ch["change_low"][g],
                            high=100 * ch["change_high"][g], p_t=t["p"], p_mcnemar=mc[g],
                            p_holm=float(holm[g]),
                            verdict=vlm_metrics.verdict(ch["change"][g], holm[g],
                                                        direction="accuracy"))
  for k, r in m["retrieval"].items():
    t = vlm_metrics.paired_t(r["max_skew_per_query"], m_fp["retrieval"][k]["max_skew_per_query"])
    change = r["max_skew"] - m_fp["retrieval"][k]["max_skew"]
    out[f"max_skew@{k}"] = dict(change=change, p_t=t["p"],
                                verdict=vlm_metrics.verdict(change, t["p"],
                                                            direction="max_skew"))
  return out


def run_seed(config, root: str, seed: int) -> dict:
  """Every quantizer of one seed (finished ones reused): name -> result."""
  seed_dir = os.path.join(root, f"seed{seed}")
  res_dir = os.path.join(seed_dir, "results")
  os.makedirs(res_dir, exist_ok=True)
  d = load_data(config)
  data, train, test = d["data"], d["train"], d["test"]
  model = CLIP(vlm_quant.clip_config(config, d["tokenizer"].get_vocab_size(), d["eos"]))
  params = vlm_quant.train_clip(model, data.images[train], d["captions"][train], config, seed,
                                os.path.join(seed_dir, "fp32"))
  labels, groups, g = data.labels[test], data.skin_type[test], d["num_groups"]
  ks = [int(k) for k in str(config.retrieval_k).split(",")]
  calib_rows = np.random.default_rng(seed).permutation(train)[:config.quant.calib_images]
  calib = dict(images=data.images[calib_rows], labels=data.labels[calib_rows],
               groups=data.skin_type[calib_rows], prompts=d["prompts"], num_groups=g)
  emb = lambda m, p: vlm_quant.embeddings(m, p, data.images[test], d["prompts"], d["queries"])
  fp = metrics(emb(model, params), labels, groups, g, ks)
  out = {}
  for name in [q.strip() for q in config.quantizers.split(",") if q.strip()]:
    path = os.path.join(res_dir, f"{name}.json")
    if os.path.exists(path):
      out[name] = wd.read_json(path)
      continue
    qmodel, qparams, info = vlm_quant.quantized(name, model, params, config, calib)
    m = fp if name == "fp32" else metrics(emb(qmodel, qparams), labels, groups, g, ks)
    res = dict(info=info, zero_shot=m["zero_shot"],
               retrieval={k: {f: v for f, v in r.items() if not f.endswith("per_query")}
                          for k, r in m["retrieval"].items()})
    if name != "fp32":
      res["cells"] = cells(m, fp, groups, g, config, seed)
    wd.write_json(path + ".tmp", wd.jsonable(res))
    os.replace(path + ".tmp", path)
    out[name] = wd.read_json(path)
  wd.write_json(os.path.join(seed_dir, "report.json"), out)
  return out


def summarize(runs: dict[int, dict]) -> dict:
  """Verdict counts per quantizer, and the cells whose verdict differs across seeds."""
  seeds = sorted(runs)
  counts, flips = {}, {}
  for name in runs[seeds[0]]:
    if "cells" not in runs[seeds[0]][name]:
      continue
    counts[name] = {v: 0 for v in ("amplified", "reduced", "no change")}
    for cell in runs[seeds[0]][name]["cells"]:
      verdicts = [runs[s][name]["cells"][cell]["verdict"] for s in seeds]
      for v in verdicts:
        counts[name][v] += 1
      if {"amplified", "reduced"} <= set(verdicts):
        flips.setdefault(name, []).append(cell)
  return dict(seeds=seeds, counts=counts, opposite_verdicts_across_seeds=flips)


def format_table(runs: dict[int, dict], group_names: Sequence[str], k: str) -> str:
  """Mean +- std over seeds: accuracy, worst group, gap, MaxSkew/MinSkew@k, verdicts."""
  seeds = sorted(runs)
  ms = lambda v: f"{np.mean(v):6.2f} +- {np.std(v):4.2f}"
  head = (f"{'quantizer':13s} {'bits':>5s} {'accuracy':>14s} {'worst group':>14s} "
          f"{'gap':>14s} {'MaxSkew@' + k:>14s} {'MinSkew@' + k:>14s}  verdicts (amp/red/none)")
  lines = [f"Mean +- std over seeds {seeds} (SYNTHETIC data); groups: {', '.join(group_names)}",
           head]
  for name, r0 in runs[seeds[0]].items():
    zs = [runs[s][name]["zero_shot"] for s in seeds]
    rt = [runs[s][name]["retrieval"][k] for s in seeds]
    v = [c["verdict"] for s in seeds for c in runs[s][name].get("cells", {}).values()]
    counts = "-" if not v else "/".join(str(v.count(x)) for x in ("amplified", "reduced",
                                                                   "no change"))
    lines.append(f"{name:13s} {r0['info']['avg_bits']:5.2f} "
                 f"{ms([100 * z['accuracy'] for z in zs]):>14s} "
                 f"{ms([100 * z['worst_group_accuracy'] for z in zs]):>14s} "
                 f"{ms([100 * z['accuracy_gap'] for z in zs]):>14s} "
                 f"{ms([x['max_skew'] for x in rt]):>14s} {ms([x['min_skew'] for x in rt]):>14s}"
                 f"  {counts}")
  return "\n".join(lines)


def plot_verdicts(path: str, runs: dict[int, dict], group_names: Sequence[str]) -> None:
  """ROOT/verdicts.png: mean change per (quantizer, cell) over seeds, verdict counts written in."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  seeds = sorted(runs)
  names = [n for n in runs[seeds[0]] if "cells" in runs[seeds[0]][n]]
  if not names:
    return
  cells_ = list(runs[seeds[0]][names[0]]["cells"])
  mean = np.array([[np.nanmean([np.nan if runs[s][n]["cells"][c]["change"] is None
                                else runs[s][n]["cells"][c]["change"] for s in seeds])
                    for c in cells_] for n in names], np.float64)
  # Skew changes are in log units, accuracy changes in points: scale columns apart.
  scaled = mean / np.maximum(np.nanmax(np.abs(mean), 0, keepdims=True), 1e-12)
  fig, ax = plt.subplots(figsize=(1.1 * len(cells_) + 2, 0.5 * len(names) + 1.5))
  ax.imshow(scaled, cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
  labels = [f"type {group_names[int(c[5:])]}" if c.startswith("group") else c for c in cells_]
  ax.set_xticks(range(len(cells_)), labels, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  for i, n in enumerate(names):
    for j, c in enumerate(cells_):
      v = [runs[s][n]["cells"][c]["verdict"] for s in seeds]
      tag = f"{mean[i, j]:+.2f}\n{v.count('amplified')}a {v.count('reduced')}r"
      ax.text(j, i, tag, ha="center", va="center", fontsize=6)
  ax.set_title(f"change from fp32 (accuracy: points; MaxSkew: log) over seeds {seeds}; "
               "a/r: seeds amplified/reduced (SYNTHETIC)", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/vlm.py", "The study's config.")
  flags.DEFINE_string("root", None, "The study's directory.", required=True)
  flags.DEFINE_list("seeds", ["0"], "Model seeds.")


def main(argv: Sequence[str]) -> None:
  """Runs every seed, prints the table, writes ROOT/summary.json."""
  del argv
  host.tune_allocator()
  experiment.quiet_logging()
  f = flags.FLAGS
  for name in f.config.quantizers.split(","):  # unknown names fail before any work
    vlm_quant.QUANTIZERS.get(name.strip())
  runs = {int(s): run_seed(f.config, f.root, int(s)) for s in f.seeds}
  summary = summarize(runs)
  wd.write_json(os.path.join(f.root, "summary.json"), wd.jsonable(dict(runs=runs, **summary)))
  names = synthetic.generate(f.config.data.seed, 1).group_names
  plot_verdicts(os.path.join(f.root, "verdicts.png"), runs, names)
  print(format_table(runs, names, str(f.config.retrieval_k).split(",")[0]))
  print(json.dumps(summary["counts"]))
  print("opposite verdicts across seeds:", json.dumps(summary["opposite_verdicts_across_seeds"]))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
