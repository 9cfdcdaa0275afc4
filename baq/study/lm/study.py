r"""The language-model bias study: `python -m baq.study.lm --config=configs/lm.py --workdir=W`.

Per seed (`config.seeds`), in WORKDIR/seed<S>:
  fp32/           the trained model's checkpoints (source "train"; resumed)
  results/<setting>.json   each setting's metrics (a finished setting is reused)
  report.json     every setting of the seed
and WORKDIR/summary.json, the mean +- std over seeds, printed as a table:
the CrowS-Pairs stereotype score, its change from full precision with the
number of seeds whose exact McNemar test rejects at 0.05, the StereoSet SS,
LMS and ICAT (intrasentence), and held-out perplexity.

With the synthetic data (the default) the corpus is written once to
WORKDIR/data; the seed varies the model's initialisation, its batches and the
calibration sample, not the corpus.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import numpy as np

from baq import launch
from baq.experiment import checks
from baq.data.text import crows_pairs, stereoset as stereoset_data, synthetic, tokenizer as tok
from baq.models.lm import LM_FAMILIES, gguf, hf
from baq.models.lm.decoder import CausalLM
from baq.ptq import decoder as gd
from baq.registry import Registry
from baq.study.lm import evaluate as lm_eval, exports, quant as lm_quant
from baq.train import fit
from baq import workdir as wd

FLOAT = "fp32"
EXPORTS = exports.EXPORTS  # config.export's formats (`baq.study.lm.exports`)


def _read_lines(path: str, what: str) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no file {path!r}.")
  with open(path) as f:
    return [l.strip() for l in f if l.strip()]


def load_texts(config, root: str) -> dict:
  """The study's text: train / calibration lines, held-out lines, the paired sets."""
  d = config.data
  if d.kind == "synthetic":
    folder = wd.path(root, wd.STUDY_DATA_DIR)

    def make():  # once, by process 0; the others read what it wrote
      if not os.path.isfile(os.path.join(folder, "README")):
        synthetic.write(folder, synthetic.generate(d.seed, association=d.association,
                                                   num_train=d.num_train,
                                                   num_heldout=d.num_heldout))
    launch.primary_first(make, "baq: LM corpus written")
    files = dict(train=os.path.join(folder, "train.txt"),
                 heldout=os.path.join(folder, "heldout.txt"),
                 crows=os.path.join(folder, "crows_pairs_anonymized.csv"),
                 pairs=os.path.join(folder, "calibration_pairs.csv"),
                 stereoset=os.path.join(folder, "dev.json"))
  elif d.kind == "files":
    files = dict(train=d.calibration or d.heldout, heldout=d.heldout, crows=d.crows_pairs,
                 pairs=d.get("calibration_pairs", "") or "", stereoset=d.stereoset)
  else:
    raise ValueError(f"Unknown data.kind {d.kind!r}. Valid: synthetic, files.")
  out = dict(train=_read_lines(files["train"], "training / calibration text"),
             heldout=_read_lines(files["heldout"], "held-out text"),
             crows=crows_pairs.load_crows_pairs(files["crows"]),
             stereoset=(stereoset_data.load_stereoset(files["stereoset"])
                        if files["stereoset"] else None))
  out["pairs"] = crows_pairs.load_crows_pairs(files["pairs"]) if files["pairs"] else None
  return out


def gpt2_config(config, vocab: int, special: Optional[dict] = None) -> dict:
  """The config.json of the trained model: a GPT-2 of the config's size (so it exports).

  `special`: the tokenizer's bos/eos ids (`tokenizer.special_ids`), which
  runtimes read from config.json.
  """
  m = config.model
  special = special or {}
  ids = {f"{k}_token_id": special[k] for k in ("bos", "eos") if special.get(k) is not None}
  return {**ids, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
          "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.d_ff,
          "n_positions": config.data.max_len, "layer_norm_epsilon": 1e-5,
          "activation_function": "gelu_new", "tie_word_embeddings": True}


# config.model.source -> build(config, texts, seed_dir, seed) -> dict(model, params,
# tokenizer, family, hf_config): where the float model comes from.
MODEL_SOURCES: Registry[Callable[..., dict]] = Registry("LM study model source")


@MODEL_SOURCES.register("hf")
def _hf_source(config, texts: dict, seed_dir: str, seed: int) -> dict:
  """A Hugging Face checkpoint folder, `model.hf_folder`."""
  model, variables, tokenizer, family = hf.load(config.model.hf_folder)
  if tokenizer is None:
    raise FileNotFoundError(f"{config.model.hf_folder} has no tokenizer.json.")
  return dict(model=model, params=variables["params"], tokenizer=tokenizer, family=family,
              hf_config=hf.read_folder(config.model.hf_folder)[0])


@MODEL_SOURCES.register("gguf")
def _gguf_source(config, texts: dict, seed_dir: str, seed: int) -> dict:
  """A GGUF file, `model.gguf_file`, with the tokenizer of its metadata."""
  contents = gguf.read(config.model.gguf_file)
  if contents.tokenizer is None:
    raise ValueError(f"{config.model.gguf_file} has no tokenizer metadata.")
  model, variables, tokenizer, family = gguf.build(contents)
  return dict(model=model, params=variables["params"], tokenizer=tokenizer, family=family,
              hf_config=gguf.hf_config(contents))


@MODEL_SOURCES.register("train")
def _train_source(config, texts: dict, seed_dir: str, seed: int) -> dict:
  """A GPT-2 of the config's size, trained on the text (resumed from its checkpoints)."""
  tokenizer = tok.word_tokenizer(texts["train"])
  ids = tok.special_ids(tokenizer)
  x, lengths = tok.encode_batch(tokenizer, texts["train"], bos_id=ids["bos"], eos_id=ids["eos"],
                                pad_id=ids["pad"], max_len=config.data.max_len)
  hf_config = gpt2_config(config, tokenizer.get_vocab_size(), ids)
  model = CausalLM(LM_FAMILIES.get("gpt2").config_from_hf(hf_config))
  t = config.train
  cfg = fit.FitConfig(steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                      warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
                      seed=seed, save_every=t.save_every)
  params, _ = fit.train_lm(model, x, lengths, cfg, os.path.join(seed_dir, FLOAT))
  return dict(model=model, params=params, tokenizer=tokenizer, family="gpt2",
              hf_config=hf_config)


def build_model(config, texts: dict, seed_dir: str, seed: int) -> dict:
  """The float model from `config.model.source` (`MODEL_SOURCES`).

  Returns:
    dict(model, params, tokenizer, family, hf_config).
  """
  return MODEL_SOURCES.get(config.model.source)(config, texts, seed_dir, seed)


def calibration(config, texts: dict, tokenizer, seed: int) -> lm_quant.Calibration:
  """The calibration sequences (a seeded sample of the training text) and pairs."""
  ids = tok.special_ids(tokenizer)
  kw = dict(bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"] or 0,
            max_len=config.data.max_len)
  rows = np.random.default_rng(seed).permutation(len(texts["train"]))
  lines = [texts["train"][i] for i in rows[:config.quant.calib_sequences]]
  tokens = gd.Tokens(*tok.encode_batch(tokenizer, lines, **kw))
  source = config.quant.pair_source
  if source == "calibration":
    if texts["pairs"] is None:
      raise ValueError("quant.pair_source=calibration needs data.calibration_pairs "
                       "(a CrowS-Pairs-layout CSV).")
    a_text, b_text = texts["pairs"].sent_more, texts["pairs"].sent_less
    types = texts["pairs"].bias_type
  elif source == "stereoset":
    task = texts["stereoset"].tasks["intrasentence"]
    a_text, b_text, types = task.sentences[:, 0], task.sentences[:, 1], task.bias_type
  else:
    raise ValueError(f"Unknown quant.pair_source {source!r}. Valid: calibration, stereoset.")
  both = tok.encode_batch(tokenizer, list(a_text) + list(b_text), **kw)
  n = len(a_text)
  pairs = (gd.Tokens(both[0][:n], both[1][:n]), gd.Tokens(both[0][n:], both[1][n:]))
  return lm_quant.Calibration(tokens, pairs, np.asarray(types))


def _progress(seed: int, name: str, row: dict, t0: float) -> None:
  """One line per finished setting (process 0): the study runs for minutes."""
  if launch.is_primary():
    print(f"[lm] seed {seed} {name}: CrowS {row['crows']:.2f}, perplexity {row['ppl']:.3f}, "
          f"{row['avg_bits']:.2f} bits ({time.time() - t0:.0f} s)", flush=True)


def _row(summary: dict, info: dict) -> dict:
  """The figures a table shows, from one setting's summary."""
  intra = summary["stereoset"].get("intrasentence", {}).get("overall", {})
  row = dict(crows=summary["crows"]["overall"]["metric_score"],
             ppl=summary["perplexity"]["perplexity"], ss=intra.get("ss", np.nan),
             lms=intra.get("lms", np.nan), icat=intra.get("icat", np.nan),
             avg_bits=info.get("avg_bits", 32.0), gap=summary["gap"]["mean"])
  for b in summary["crows"]["per_bias_type"]:
    row[f"crows_{b}"] = summary["crows"]["per_bias_type"][b]["metric_score"]
  if "change" in summary:
    row.update(change=summary["change"]["overall"]["change"],
               p=summary["change"]["overall"]["p_value"],
               gap_change=summary["gap_change"]["change"],
               gap_p=summary["gap_change"]["p_wilcoxon"])
  return row


def run_seed(config, root: str, seed: int) -> dict:
  """Every setting of one seed (finished ones reused); setting -> table row."""
  t0 = time.time()
  seed_dir = wd.seed_dir(root, seed)
  os.makedirs(wd.path(seed_dir, wd.RESULTS_DIR), exist_ok=True)
  texts = load_texts(config, root)
  built = build_model(config, texts, seed_dir, seed)
  model, params, tokenizer = built["model"], built["params"], built["tokenizer"]
  family = LM_FAMILIES.get(built["family"])
  modules = list(family.hf_modules(model.config).values()) if family.hf_modules else []
  enc = lm_eval.encode(texts["crows"], texts["stereoset"], texts["heldout"], tokenizer,
                       max_len=config.data.max_len)
  kw = dict(num_samples=config.bootstrap, seed=seed)
  fp_scores = lm_eval.score(model, {"params": params}, enc)
  rows = {FLOAT: _row(lm_eval.summarize(fp_scores, texts["crows"], texts["stereoset"], **kw),
                      {})}
  _progress(seed, FLOAT, rows[FLOAT], t0)
  calib = calibration(config, texts, tokenizer, seed)
  for name in lm_quant.settings(config):
    path = wd.result_path(seed_dir, name)
    if os.path.exists(path):
      with open(path) as f:
        rows[name] = json.load(f)["row"]
      continue
    numeric = lm_quant.METHODS.parse(name)[0].kind == "numerics"
    if numeric:  # a runtime's numerics: the same params, another model
      (qmodel, info), qparams, records = lm_quant.numeric_setting(name, model), params, {}
    else:
      qmodel = model
      qparams, records, info = lm_quant.quantize(name, model, params, calib, config,
                                                 model.config.n_layers, modules)
    summary = lm_eval.summarize(lm_eval.score(qmodel, {"params": qparams}, enc),
                                texts["crows"], texts["stereoset"], fp_scores, **kw)
    rows[name] = _row(summary, info)
    _progress(seed, name, rows[name], t0)
    if config.export and numeric:
      info["export"] = None  # an LM export holds baq's grid, not a runtime's numerics
    elif config.export:
      info["export"], record = exports.export(config, seed_dir, name, family, model.config,
                                              params, qparams, records, built)
      if record is not None:
        info[config.export] = record
    layers = {k: {f: v for f, v in r.items() if f not in ("codes", "scales")}
              for k, r in records.items()}
    if launch.is_primary():
      with open(path + ".tmp", "w") as f:
        json.dump(wd.jsonable(dict(row=rows[name], info=info, summary=summary, layers=layers)),
                  f)
      os.replace(path + ".tmp", path)
  if launch.is_primary():
    wd.write_json(wd.path(seed_dir, wd.SEED_REPORT_FILE), wd.jsonable(rows))
  return rows


def format_table(runs: dict[int, dict]) -> str:
  """Mean +- std over seeds per setting.

  `sig` counts the seeds whose exact McNemar test of the score change rejects
  at 0.05; `gap` is the mean stereotype gap ll(sent_more) - ll(sent_less) in
  nats, and `gsig` the seeds whose Wilcoxon test of its change rejects.
  """
  seeds = sorted(runs)
  cols = ("CrowS score", "change", "sig", "gap", "gap change", "gsig", "SS", "ICAT",
          "perplexity")
  widths = (14, 14, 4, 15, 15, 4, 13, 13, 15)
  head = f"{'setting':18s} {'bits':>5s}" + "".join(f" {c:>{w}s}" for c, w in zip(cols, widths))
  lines = [f"Mean +- std over seeds {seeds} (SYNTHETIC data when data.kind=synthetic)", head]

  def ms(key, name, digits=2):
    v = [runs[s][name].get(key, np.nan) for s in seeds]
    return "-" if np.isnan(v).all() else f"{np.mean(v):6.{digits}f} +- {np.std(v):4.{digits}f}"

  def sig(key, name):
    if key not in runs[seeds[0]][name]:
      return "-"
    return f"{sum(runs[s][name][key] < 0.05 for s in seeds)}/{len(seeds)}"

  for name in runs[seeds[0]]:
    cells = (ms("crows", name), ms("change", name), sig("p", name), ms("gap", name, 3),
             ms("gap_change", name, 3), sig("gap_p", name), ms("ss", name), ms("icat", name),
             ms("ppl", name, 3))
    lines.append(f"{name:18s} {runs[seeds[0]][name]['avg_bits']:5.2f}"
                 + "".join(f" {c:>{w}s}" for c, w in zip(cells, widths)))
  return "\n".join(lines)


def check(config) -> None:
  """Refuses bad bits, budgets, alphas, numerics or an unknown export before any work."""
  launch.seeds(config)
  checks.at_least(config, {"train.steps": 1, "train.batch_size": 1, "train.save_every": 1,
                           "train.warmup_steps": 0, "quant.calib_sequences": 1, "bootstrap": 1,
                           "data.num_train": 1, "data.num_heldout": 1, "data.max_len": 2})
  lm_quant.settings(config)
  MODEL_SOURCES.get(config.model.source)  # an unknown name lists the valid ones
  if config.export:
    EXPORTS.get(config.export)  # an unknown name lists the valid ones
  exports.scale_dtype(config)


def run(config, root: str) -> dict:
  """Runs every seed of `config.seeds`; process 0 writes WORKDIR/summary.json and
  prints the table.

  Returns:
    {seed: {setting: metrics}}.
  """
  check(config)
  runs = {s: run_seed(config, root, s) for s in launch.seeds(config)}
  if launch.is_primary():
    wd.write_json(wd.path(root, wd.SUMMARY_FILE), wd.jsonable(runs))
    print(format_table(runs), flush=True)
  return runs
