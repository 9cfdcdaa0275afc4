r"""The "inconsistent biases" study on CLIP: `python -m baq.study.vlm --config=configs/vlm.py --workdir=W`.

Per seed (`config.seeds`), in WORKDIR/seed<S>:
  fp32/                 the in-run CLIP's checkpoints (model.source "train"; resumed)
  results/<quantizer>.json   its metrics and cells per attribute, and the settings
                        it was made with (a finished one is reused; one made
                        with other settings is refused)
  report.json           every quantizer of the seed
and WORKDIR/summary.json + WORKDIR/verdicts.png: per (quantizer, cell) the change
from full precision and a verdict (amplified / reduced / no change at 0.05).
Cells, per attribute of the data (`baq.study.vlm.data`):
  <attribute>/<group>       zero-shot accuracy change of the group (points),
                            the paper's paired t-test, baq's bootstrap interval
                            and exact McNemar test with Holm's correction
                            across the attribute's groups; amplified when the
                            group's accuracy fell
  max_skew@<k>/<attribute>  change of the neutral queries' mean MaxSkew@k over
                            the attribute's groups (paired t-test over
                            queries); amplified when it rose
The summary counts how the cells go, per quantizer and over seeds: the paper's inconsistency.

Data (`data.kind`): SYNTHETIC lesions over skin types (default), FairFace
(retrieval), FACET (zero-shot person class), a labelled image folder. Model
(`model.source`): the in-run CLIP trained on the synthetic captions, or a
pretrained Hugging Face / OpenCLIP checkpoint (`baq.study.vlm.quant`); a
pretrained checkpoint is fixed, so its seeds differ only in the bootstrap.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional, Sequence

import flax.traverse_util as tu
import numpy as np

from baq import launch, progress
from baq.experiment import checks
from baq.fairness import vlm_metrics
from baq.stats import corrections, significance as stats
from baq.study.vlm import data as vlm_data, quant as vlm_quant
from baq import workdir as wd


def metrics(emb: dict, data: vlm_data.VLMData, rows, ks: Sequence[int]) -> dict:
  """Per attribute: zero-shot per-group accuracy and disparities, retrieval skew at each k."""
  out = dict(zero_shot={}, retrieval={})
  if emb["classes"] is not None:
    pred = vlm_metrics.zero_shot_predictions(emb["image"], emb["classes"])
    labels = data.labels[rows]
    out["correct"] = (pred == labels).astype(np.int8)
  for a, (ids, names) in data.attributes.items():
    g = ids[rows]
    sel = g != vlm_data.EXCLUDED
    if "correct" in out:
      out["zero_shot"][a] = vlm_metrics.group_accuracy_disparity(
          pred[sel], labels[sel], g[sel], len(names), attribute=a,
          num_classes=len(emb["classes"]))
    if emb["queries"] is not None:
      sim = emb["queries"] @ emb["image"][sel].T
      out["retrieval"][a] = {str(k): vlm_metrics.retrieval_skew(
          sim, g[sel], k, num_groups=len(names), attribute=a) for k in ks}
  return out


def _p_t(quant, float_) -> Optional[float]:
  """The paired t-test's p (None with fewer than two pairs)."""
  return vlm_metrics.paired_t(quant, float_)["p"] if len(quant) >= 2 else None


def _accuracy_cells(attribute: str, names, correct, correct_fp, groups, config,
                    seed: int) -> dict:
  """`<attribute>/<group>` cells: accuracy change, Holm's correction over the groups."""
  n = len(names)
  ch = stats.paired_change(correct, correct_fp, groups, n, num_samples=config.bootstrap,
                           seed=seed)
  mc = [stats.mcnemar_exact(correct_fp[groups == g], correct[groups == g])["p_value"]
        for g in range(n)]
  holm = corrections.adjust(mc, "holm")
  return {f"{attribute}/{name}": dict(
      change=100 * ch["change"][g], low=100 * ch["change_low"][g],
      high=100 * ch["change_high"][g],
      p_t=_p_t(correct[groups == g], correct_fp[groups == g]), p_mcnemar=mc[g],
      p_holm=float(holm[g]), verdict=vlm_metrics.verdict(ch["change"][g], holm[g],
                                                         direction="accuracy"))
          for g, name in enumerate(names)}


def cells(m: dict, m_fp: dict, data: vlm_data.VLMData, rows, config, seed: int) -> dict:
  """Per attribute, the (quantizer, group) cells against full precision and the skew cells."""
  out = {}
  for a, (ids, names) in data.attributes.items():
    g = ids[rows]
    sel = g != vlm_data.EXCLUDED
    if "correct" in m:
      out.update(_accuracy_cells(a, names, m["correct"][sel], m_fp["correct"][sel], g[sel],
                                 config, seed))
    for k, r in m["retrieval"].get(a, {}).items():
      fp = m_fp["retrieval"][a][k]
      p = _p_t(r["max_skew_per_query"], fp["max_skew_per_query"])
      change = r["max_skew"] - fp["max_skew"]
      out[f"max_skew@{k}/{a}"] = dict(
          change=change, p_t=p, verdict=vlm_metrics.verdict(
              change, np.nan if p is None else p, direction="max_skew"))
  return out


def _setting(config) -> dict:
  """What a result depends on: the config but for the quantizers and seeds (JSON-ready)."""
  setting = {k: v for k, v in config.to_dict().items() if k not in ("quantizers", "seeds")}
  return json.loads(json.dumps(wd.jsonable(setting)))


def _reuse(path: str, setting: dict) -> dict:
  """A finished result, refused when it was made with other settings."""
  res = wd.read_json(path)
  if "setting" not in res:
    raise ValueError(f"{path} records no settings (an older baq wrote it); use another --workdir.")
  if res["setting"] != setting:
    old, new = (tu.flatten_dict(d, sep=".") for d in (res["setting"], setting))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    raise ValueError(f"{path} was made with other settings (differing: "
                     f"{', '.join(diff[:6])}); use another --workdir.")
  return res


def _score(config, seed_dir: str, seed: int, names: Sequence[str], setting: dict,
           p: progress.Progress) -> dict:
  """Scores the quantizers `names` and writes results/<name>.json for each."""
  b = vlm_data.prepare(config, seed_dir, seed)
  data, test, model, params = b["data"], b["test"], b["model"], b["params"]
  calib = vlm_data.calibration(b, config.quant.attribute)
  for name in names:
    if vlm_quant.needs_calibration(name) and calib is None:
      raise ValueError(f"{name} needs zero-shot labels for its group losses; data.kind "
                       f"{config.data.kind!r} is a retrieval task. Leave it out of quantizers.")
  ks = [int(k) for k in str(config.retrieval_k).split(",")]
  emb = lambda m, p: vlm_quant.embeddings(m, p, data.images[test], b["prompts"], b["queries"],
                                          b["stats"])
  fp = metrics(emb(model, params), data, test, ks)
  p.note("data, model and full precision ready")
  about = dict(title=data.title, images=len(test),
               groups={a: names_ for a, (_, names_) in data.attributes.items()})
  out = {}
  for name in names:
    qmodel, qparams, info = vlm_quant.quantized(name, model, params, config, calib)
    m = fp if name == "fp32" else metrics(emb(qmodel, qparams), data, test, ks)
    res = dict(info=info, setting=setting, data=about, zero_shot=m["zero_shot"],
               retrieval={a: {k: {f: v for f, v in r.items() if not f.endswith("per_query")}
                              for k, r in by_k.items()} for a, by_k in m["retrieval"].items()})
    if name != "fp32":
      res["cells"] = cells(m, fp, data, test, config, seed)
    path = wd.result_path(seed_dir, name)
    out[name] = json.loads(json.dumps(wd.jsonable(res)))  # as a reader of the file sees it
    if launch.is_primary():
      wd.write_json(path + ".tmp", out[name])
      os.replace(path + ".tmp", path)
    p.done(name)
  return out


def run_seed(config, root: str, seed: int) -> dict:
  """Every quantizer of one seed (finished ones reused): name -> result."""
  seed_dir = wd.seed_dir(root, seed)
  os.makedirs(wd.path(seed_dir, wd.RESULTS_DIR), exist_ok=True)
  names = [q.strip() for q in config.quantizers.split(",") if q.strip()]
  setting = _setting(config)
  paths = {n: wd.result_path(seed_dir, n) for n in names}
  out = {n: _reuse(f, setting) for n, f in paths.items() if os.path.exists(f)}
  todo = [n for n in names if n not in out]
  p = progress.Progress("vlm", len(names), unit="quantizer", prefix=f"seed {seed}")
  for n in out:
    p.done(n, reused=True)
  if todo:
    out.update(_score(config, seed_dir, seed, todo, setting, p))
  out = {n: out[n] for n in names}
  if launch.is_primary():
    wd.write_json(wd.path(seed_dir, wd.SEED_REPORT_FILE), out)
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


def _attribute(cell: str) -> str:
  """The attribute of a cell name: `<attribute>/<group>` or `max_skew@<k>/<attribute>`."""
  head, rest = cell.split("/", 1)
  return rest if head.startswith("max_skew@") else head


def format_table(runs: dict[int, dict], k: str) -> str:
  """Per quantizer and attribute, mean +- std over seeds: accuracy, worst group, gap,
  MaxSkew/MinSkew@k, and the verdict counts of the attribute's cells."""
  seeds = sorted(runs)
  ms = lambda v: "-" if not v else f"{np.mean(v):6.2f} +- {np.std(v):4.2f}"
  about = next(iter(runs[seeds[0]].values()))["data"]
  head = (f"{'quantizer':13s} {'attribute':10s} {'bits':>5s} {'accuracy':>14s} "
          f"{'worst group':>14s} {'gap':>14s} {'MaxSkew@' + k:>14s} {'MinSkew@' + k:>14s}"
          "  verdicts (amp/red/none)")
  lines = [f"Mean +- std over seeds {seeds} ({about['title']}, {about['images']} images)", head]
  for name, r0 in runs[seeds[0]].items():
    for a in r0["data"]["groups"]:
      zs = [runs[s][name]["zero_shot"][a] for s in seeds if a in runs[s][name]["zero_shot"]]
      rt = [runs[s][name]["retrieval"][a][k] for s in seeds if a in runs[s][name]["retrieval"]]
      v = [c["verdict"] for s in seeds for cell, c in runs[s][name].get("cells", {}).items()
           if _attribute(cell) == a]
      counts = "-" if not v else "/".join(str(v.count(x)) for x in vlm_metrics.VERDICTS)
      lines.append(f"{name:13s} {a:10s} {r0['info']['avg_bits']:5.2f} "
                   f"{ms([100 * z['accuracy'] for z in zs]):>14s} "
                   f"{ms([100 * z['worst_group_accuracy'] for z in zs]):>14s} "
                   f"{ms([100 * z['accuracy_gap'] for z in zs]):>14s} "
                   f"{ms([x['max_skew'] for x in rt]):>14s} "
                   f"{ms([x['min_skew'] for x in rt]):>14s}  {counts}")
  lines += [f"  {a}: {', '.join(g)}" for a, g in about["groups"].items()]
  return "\n".join(lines)


def plot_verdicts(path: str, runs: dict[int, dict]) -> None:
  """WORKDIR/verdicts.png: mean change per (quantizer, cell) over seeds, verdict counts written in."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  seeds = sorted(runs)
  names = [n for n in runs[seeds[0]] if "cells" in runs[seeds[0]][n]]
  if not names:
    return
  cells_ = list(runs[seeds[0]][names[0]]["cells"])
  change = np.array([[[np.nan if runs[s][n]["cells"][c]["change"] is None
                        else runs[s][n]["cells"][c]["change"] for s in seeds]
                       for c in cells_] for n in names], np.float64)
  with warnings.catch_warnings():  # a group without images has no change: an empty cell
    warnings.simplefilter("ignore", RuntimeWarning)
    mean = np.nanmean(change, axis=-1)
    # Skew changes are in log units, accuracy changes in points: scale columns apart.
    scaled = mean / np.maximum(np.nanmax(np.abs(mean), 0, keepdims=True), 1e-12)
  fig, ax = plt.subplots(figsize=(1.1 * len(cells_) + 2, 0.5 * len(names) + 1.5))
  ax.imshow(scaled, cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
  ax.set_xticks(range(len(cells_)), cells_, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(names)), names, fontsize=8)
  for i, n in enumerate(names):
    for j, c in enumerate(cells_):
      v = [runs[s][n]["cells"][c]["verdict"] for s in seeds]
      value = "n/a" if np.isnan(mean[i, j]) else f"{mean[i, j]:+.2f}"
      tag = f"{value}\n{v.count('amplified')}a {v.count('reduced')}r"
      ax.text(j, i, tag, ha="center", va="center", fontsize=6)
  title = runs[seeds[0]][names[0]]["data"]["title"]
  ax.set_title(f"change from fp32 (accuracy: points; MaxSkew: log) over seeds {seeds}; "
               f"a/r: seeds amplified/reduced ({title})", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def check(config) -> None:
  """Refuses unknown quantizers, data kinds and model sources before any work."""
  for name in config.quantizers.split(","):  # unknown names list the valid ones
    vlm_quant.parse(name)
  launch.seeds(config)
  checks.at_least(config, {"train.steps": 1, "train.batch_size": 1, "train.save_every": 1,
                           "train.warmup_steps": 0, "bootstrap": 1, "data.max_len": 2,
                           "data.image_size": 8, "data.max_images": 0})
  ks = [k.strip() for k in str(config.retrieval_k).split(",") if k.strip()]
  if not ks or not all(k.isdigit() and int(k) >= 1 for k in ks):
    raise ValueError(f"retrieval_k={config.retrieval_k!r} must list integers >= 1 (\"20,100\").")
  vlm_data.DATA_KINDS.get(config.data.kind)
  vlm_quant.SOURCES.get(config.model.source)


def run(config, root: str) -> dict:
  """Runs every seed of `config.seeds`; process 0 writes WORKDIR/summary.json and
  WORKDIR/verdicts.png and prints the table.

  Returns:
    {seed: report} of every seed.
  """
  check(config)
  runs = {s: run_seed(config, root, s) for s in launch.seeds(config)}
  if launch.is_primary():
    summary = summarize(runs)
    wd.write_json(wd.path(root, wd.SUMMARY_FILE), wd.jsonable(dict(runs=runs, **summary)))
    plot_verdicts(wd.path(root, wd.VERDICTS_PLOT), runs)
    print(format_table(runs, str(config.retrieval_k).split(",")[0]))
    print(json.dumps(summary["counts"]))
    print("opposite verdicts across seeds:",
          json.dumps(summary["opposite_verdicts_across_seeds"]), flush=True)
  return runs
