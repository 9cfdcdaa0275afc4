"""The bias study: quantizers x bit budgets x seeds, then per-group statistics.

  python -m baq.study.bias --config=configs/bias_study.py --workdir=/tmp/baq_study

`run_study(config, root)` runs every cell of the grid that is not finished
(each computed by `baq.study.bias.cells`, Fair-GPTQ's pairs from `baq.study.bias.pairs`),
then `baq.study.bias.report` compares each quantized setting with the float model
of the same seed on the same test examples (baq.stats.significance) and writes
ROOT/study.json, ROOT/accuracy_vs_bits.png and ROOT/pareto.png. ROOT holds
(names from `baq.workdir`):
  ROOT/fp32_s<S>/               the float model of seed S (trained once, in
                                run/, or taken from `study.reuse`) and its
                                test predictions
  ROOT/<setting>_s<S>/          one cell: predictions.npz (logits, labels,
                                groups of the test split), then metrics.json,
                                written last: a cell is finished when it has
                                both; an interrupted cell is redone (trained
                                cells resume from their checkpoints in run/)
Quantizers (weights only; `config.quant.float_layers` stay float):
  rtn        round-to-nearest on the symmetric per-channel absmax grid
             (`gptq_model.quantize_model(method="rtn")`).
  gptq       GPTQ on the same per-channel grid, calibrated on `calib_size`
             training examples drawn with the seed.
  fair_gptq  Fair-GPTQ at each of `alphas` (in every layer of `fair_layers`).
             Pairs (`pairs`): "counterfactual" (the synthetic data: training
             lesions rendered on skin type g and on the reference type),
             "penultimate" or "pixels" (`match_pairs` of training examples of
             group g with same-label examples of the reference group, on the
             float model's penultimate features or on pixels); "auto" is the
             first for synthetic_derm and "penultimate" otherwise. The
             reference is the largest training group (or `pair_reference`),
             g every other group, `num_pairs` pairs split evenly.
  qat        uniform QAT at B bits fine-tuned from the seed's float model
             (trainer mode qat, `config.steps`; granularity from
             `config.quant.granularity`, per-layer by default).
  baq        BAQ at B average bits (trainer mode baq, deployed at integers).
  llm_int8, nf4, fp4, dynamic_int8 (every method of kind "numerics")
             a runtime's numerics on the float model's Dense layers (one
             setting each, at the runtime's code bits; convolutions float;
             options from `config.numerics_options`), as the main job's
             runtime baselines (`baq.experiment.runtime_baselines`).
The names and kinds are `baq.quant.methods`'; the bits and budgets are
checked against each method's bounds.
The PTQ methods are per-channel, as GPTQ's grid is; QAT and BAQ follow the
config. `study.reuse` (e.g. "/tmp/baq_claims/seed{seed}", a train.py workdir
per seed) reuses its finished fp32/, uniform<B>/ and baq/ (when that run's
budget is B) runs instead of training them again.

The options and their defaults live in configs/bias_study.py alone; this
module reads `config.study` and refuses a config without it.
"""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np

from baq.fairness import metrics
from baq import launch
from baq.study.bias import cells as study_cells, report, resume
from baq.stats import corrections
from baq.study.bias.cells import Cell
from baq.quant import methods
from baq.experiment import job as experiment, runtime_baselines
from baq import workdir as wd
from baq.experiment.checks import at_least, validate

QUANTIZERS = study_cells.QUANTIZERS
PAIRS = ("auto", "counterfactual", "penultimate", "pixels")
# The options the study reads; their values and meanings: configs/bias_study.py.
OPTIONS = ("quantizers", "bits", "baq_bits", "alphas", "calib_size", "calib_batch",
           "pairs", "num_pairs", "pair_reference", "pair_pool", "fair_layers", "gptq_kwargs",
           "reuse", "num_bootstrap", "level", "significance", "correction", "verdict_rule",
           "skew_k", "skew_smoothing")
STUDY_CONFIG = "configs/bias_study.py"


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """Every count, probability and weight of the study options within its bounds."""
  s = config.study
  at_least(config, {f"study.{n}": 1 for n in ("calib_size", "calib_batch", "num_pairs",
                                               "pair_pool", "num_bootstrap")})
  for name in ("level", "significance"):
    if not 0 < float(s[name]) < 1:
      raise ValueError(f"study.{name}={s[name]!r} must be in (0, 1).")
  if not float(s.skew_smoothing) >= 0:
    raise ValueError(f"study.skew_smoothing={s.skew_smoothing!r} must be >= 0.")
  for name, kind, least in (("alphas", (int, float), 0), ("skew_k", int, 1)):
    values = tuple(s[name]) if isinstance(s[name], (tuple, list)) else (s[name],)
    if not all(isinstance(v, kind) and least <= v < float("inf") for v in values):
      raise ValueError(f"study.{name}={s[name]!r} must be a tuple of finite "
                       f"{'integers' if kind is int else 'numbers'} >= {least}.")


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config.study`, checked before any cell runs.

  Args:
    config: the study config (configs/bias_study.py or one built like it).

  Returns:
    The study options.

  Raises:
    ValueError: no `study` section, a missing or unknown option, or an
      unknown quantizer, pair source, correction or verdict rule.
  """
  if "study" not in config:
    raise ValueError(f"This config has no `study` section: run the study with "
                     f"--config={STUDY_CONFIG} (or add its study_options() to your config).")
  s = config.study.copy_and_resolve_references()
  if "seeds" in s:
    raise ValueError("The study's seeds are config.seeds now (one place for every driver): "
                     "set --config.seeds, not config.study.seeds.")
  unknown = sorted(set(s.keys()) - set(OPTIONS))
  if unknown:
    raise ValueError(f"Unknown study options {unknown}. Valid: {', '.join(OPTIONS)}.")
  missing = [k for k in OPTIONS if k not in s]
  if missing:
    raise ValueError(f"config.study lacks {missing}: start from {STUDY_CONFIG}'s "
                     "study_options(), which sets every option.")
  with s.unlocked():
    s.seeds = tuple(launch.seeds(config))
  bad = [q for q in _quantizers(s) if q not in QUANTIZERS]
  if bad:
    raise ValueError(f"Unknown quantizers {bad}. Valid: {', '.join(QUANTIZERS.names())}.")
  if s.pairs not in PAIRS:
    raise ValueError(f"Unknown study.pairs {s.pairs!r}. Valid: {', '.join(PAIRS)}.")
  corrections.adjust([], s.correction)  # raises on unknown names, before any cell runs
  _check_numbers(config)
  corrections.verdicts([], [], [], [], s.significance, s.verdict_rule)
  return s


def _quantizers(s: ml_collections.ConfigDict) -> list[str]:
  return [q.strip() for q in s.quantizers.split(",") if q.strip()]


def grid(config: ml_collections.ConfigDict) -> list[Cell]:
  """Every quantized cell, setting by setting (float cells are implicit).

  Args:
    config: the study config.

  Returns:
    The cells, each setting's seeds together, in `study.quantizers` order.
  """
  s, out = settings(config), []
  for q in _quantizers(s):
    method = QUANTIZERS.get(q)
    if method.kind == "numerics":  # no bit-width of its own: the runtime's code bits
      b = methods.nominal_bits(q, runtime_baselines.options(config, q))
      out += [Cell(wd.cell_name(q, seed), q, q, b, int(seed)) for seed in s.seeds]
      continue
    for b in (s.baq_bits or s.bits) if q == "baq" else s.bits:
      for a in s.alphas if method.alpha else (0.0,):
        methods.format(method, b, a if method.alpha else None)  # raises naming the bound
        setting = (f"baq_b{b:g}" if q == "baq" else
                   f"fair_gptq_a{a:g}_w{b:g}" if q == "fair_gptq" else f"{q}_w{b:g}")
        out += [Cell(wd.cell_name(setting, seed), setting, q, float(b), int(seed), float(a))
                for seed in s.seeds]
  return out


def _finished(root: str, name: str) -> bool:
  return all(os.path.exists(wd.path(root, name, f))
             for f in (wd.PREDICTIONS_FILE, wd.CELL_METRICS_FILE))


def _write_cell(root: str, name: str, logits: np.ndarray, test, info: dict) -> None:
  """predictions.npz, then metrics.json (written last, atomically: the cell is done)."""
  d = wd.path(root, name)
  done = wd.path(d, wd.CELL_METRICS_FILE)
  os.makedirs(d, exist_ok=True)
  if os.path.exists(done):
    os.remove(done)
  np.savez(wd.path(d, wd.PREDICTIONS_FILE), logits=logits.astype(np.float32),
           labels=test.labels, groups=test.groups)
  m = metrics.classification_metrics(logits.argmax(-1), test.labels, test.groups,
                                     test.num_groups)
  m.update(info)
  wd.write_json(done + ".tmp", m)
  os.replace(done + ".tmp", done)


def _check_root(config: ml_collections.ConfigDict, root: str) -> None:
  """Refuses a root whose cells were made with another config (study options may change)."""
  os.makedirs(root, exist_ok=True)
  path = wd.path(root, wd.CONFIG_FILE)
  if os.path.exists(path):
    diff = resume.conflicts(resume.cell_config(wd.read_json(path)),
                                 resume.cell_config(config))
    if diff:
      raise ValueError(f"{root} holds a study made with another config (differs in {diff}); "
                       "use a fresh --workdir, or only change the `study` options.")


def _run_cell(cell: Cell, fp: study_cells.FloatRun, root: str) -> None:
  """Computes one cell unless it is finished, and writes it."""
  if _finished(root, cell.name):
    print(f"[study] {cell.name}: finished, skipped", flush=True)
    return
  t0 = time.time()
  logits, info = study_cells.compute(cell.quantizer)(cell, fp)
  info.update(setting=cell.setting, quantizer=cell.quantizer, bits=cell.bits, seed=cell.seed,
              seconds=time.time() - t0)
  test = fp.data["test"]
  _write_cell(root, cell.name, logits, test, info)
  print(f"[study] {cell.name}: acc {np.mean(logits.argmax(-1) == test.labels):.4f} "
        f"({info['seconds']:.1f} s)", flush=True)


def run_study(config: ml_collections.ConfigDict, root: str, data: dict | None = None) -> dict:
  """Runs the unfinished cells of the grid, then analyzes all of them.

  Args:
    config: the study config (configs/bias_study.py).
    root: the study's directory (cells, study.json, plots).
    data: the splits, if already loaded (else `experiment.load_data(config)`).

  Returns:
    The study dict written to ROOT/study.json (`report.analyze`).
  """
  validate(config)
  s = settings(config)
  _check_root(config, root)
  with open(wd.path(root, wd.CONFIG_FILE), "w") as f:
    f.write(config.to_json(indent=1))
  data = data or experiment.load_data(config)
  cells = grid(config)
  for seed in s.seeds:
    c = config.copy_and_resolve_references()
    c.seed = int(seed)
    fp = study_cells.FloatRun(c, s, data, root)
    own = Cell(wd.cell_name(wd.FLOAT, seed), wd.FLOAT, wd.FLOAT, 32.0, int(seed))
    for cell in [own] + [x for x in cells if x.seed == seed]:
      _run_cell(cell, fp, root)
  return report.write(s, root, cells, data["test"], config.dataset.positive_class)
