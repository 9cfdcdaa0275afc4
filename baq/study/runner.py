"""The bias study: quantizers x bit budgets x seeds, then per-group statistics.

  python benchmarks/bias_study.py --config=configs/bias_study.py --root=/tmp/baq_study

`run_study(config, root)` runs every cell of the grid that is not finished
(each computed by `baq.study.cells`, Fair-GPTQ's pairs from `baq.study.pairs`),
then `baq.study.report` compares each quantized setting with the float model
of the same seed on the same test examples (baq.study.stats) and writes
ROOT/study.json, ROOT/accuracy_vs_bits.png and ROOT/pareto.png. ROOT holds:
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
The PTQ methods are per-channel, as GPTQ's grid is; QAT and BAQ follow the
config. `study.reuse` (e.g. "/tmp/baq_claims/seed{seed}", a train.py workdir
per seed) reuses its finished fp32/, uniform<B>/ and baq/ (when that run's
budget is B) runs instead of training them again.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

from baq.train import experiment
from baq.study import stats, report as study_report
from baq.fairness import metrics as M
from baq.study import cells as C
from baq.train.evaluate import predict_logits
from baq.train.validate import validate
from baq.study.cells import FLOAT, Cell

QUANTIZERS = ("rtn", "gptq", "fair_gptq", "qat", "baq")
PAIRS = ("auto", "counterfactual", "penultimate", "pixels")
DEFAULTS = dict(
    quantizers="rtn,gptq,fair_gptq,qat,baq",  # comma-separated, from QUANTIZERS
    bits=(8, 4),              # bit-widths of rtn, gptq, fair_gptq and qat
    baq_bits=(),              # BAQ's average-bit budgets; () = `bits`
    seeds=(0, 1, 2),          # training seeds (config.seed) of every cell
    alphas=(0.5, 2.0),        # Fair-GPTQ weights of the pair term
    calib_size=512,           # GPTQ calibration examples (training split)
    calib_batch=128,          # examples per calibration forward pass
    pairs="auto",             # auto | counterfactual | penultimate | pixels
    num_pairs=512,            # Fair-GPTQ pairs in all
    pair_reference=-1,        # reference group of the pairs; -1: the largest
    pair_pool=4096,           # training examples searched by match_pairs
    fair_layers=".*",         # regex of the layers given the pair term
    gptq_kwargs={},           # gptq.gptq options (block_size, act_order, ...)
    reuse="",                 # train.py workdir per seed, "{seed}" filled in
    num_bootstrap=2000,       # bootstrap replicates of every interval and test
    level=0.95,               # confidence level of the intervals
    significance=0.05,        # after correction
    correction="holm",        # holm | bh | none, over all (setting, group) tests
    verdict_rule="differential",  # differential | strict (see stats.verdicts)
    skew_k=(100,),            # MaxSkew/MinSkew@k of the positive-class ranking
    skew_smoothing=0.5,       # additive smoothing of top-k counts
)


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.study` over DEFAULTS; unknown keys and quantizers raise."""
  s = ml_collections.ConfigDict(DEFAULTS)
  given = config.get("study", ml_collections.ConfigDict())
  unknown = sorted(set(given.keys()) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"Unknown study options {unknown}. Valid: {', '.join(DEFAULTS)}.")
  s.update(given)
  bad = [q for q in _quantizers(s) if q not in QUANTIZERS]
  if bad:
    raise ValueError(f"Unknown quantizers {bad}. Valid: {', '.join(QUANTIZERS)}.")
  if s.pairs not in PAIRS:
    raise ValueError(f"Unknown study.pairs {s.pairs!r}. Valid: {', '.join(PAIRS)}.")
  stats.adjust([], s.correction)  # raises on unknown names, before any cell runs
  stats.verdicts([], [], [], [], s.significance, s.verdict_rule)
  return s


def _quantizers(s) -> list[str]:
  return [q.strip() for q in s.quantizers.split(",") if q.strip()]


def grid(config: ml_collections.ConfigDict) -> list[Cell]:
  """Every quantized cell, setting by setting (float cells are implicit)."""
  s, out = settings(config), []
  for q in _quantizers(s):
    for b in (s.baq_bits or s.bits) if q == "baq" else s.bits:
      for a in s.alphas if q == "fair_gptq" else (0.0,):
        setting = (f"baq_b{b:g}" if q == "baq" else
                   f"fair_gptq_a{a:g}_w{b:g}" if q == "fair_gptq" else f"{q}_w{b:g}")
        out += [Cell(f"{setting}_s{seed}", setting, q, float(b), int(seed), float(a))
                for seed in s.seeds]
  return out


def _finished(root: str, name: str) -> bool:
  d = os.path.join(root, name)
  return all(os.path.exists(os.path.join(d, f)) for f in ("predictions.npz", "metrics.json"))


def _write_cell(root: str, name: str, logits: np.ndarray, test, info: dict) -> None:
  d = os.path.join(root, name)
  os.makedirs(d, exist_ok=True)
  if os.path.exists(os.path.join(d, "metrics.json")):
    os.remove(os.path.join(d, "metrics.json"))
  np.savez(os.path.join(d, "predictions.npz"), logits=logits.astype(np.float32),
           labels=test.labels, groups=test.groups)
  m = M.classification_metrics(logits.argmax(-1), test.labels, test.groups, test.num_groups)
  m.update(info)
  with open(os.path.join(d, "metrics.json.tmp"), "w") as f:
    json.dump(m, f, indent=1)
  os.replace(os.path.join(d, "metrics.json.tmp"), os.path.join(d, "metrics.json"))


def _check_root(config, root: str) -> None:
  """Refuses a root whose cells were made with another config (study options may change)."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      diff = C.conflicts(C.cell_config(json.load(f)), C.cell_config(config))
    if diff:
      raise ValueError(f"{root} holds a study made with another config (differs in {diff}); "
                       "use a fresh --root, or only change the `study` options.")


def run_study(config: ml_collections.ConfigDict, root: str, data: dict | None = None) -> dict:
  """Runs the unfinished cells of the grid, then analyzes all of them.

  Returns:
    The study dict written to ROOT/study.json (`study_report.analyze`).
  """
  validate(config)
  s = settings(config)
  _check_root(config, root)
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(config.to_json(indent=1))
  data = data or experiment.load_data(config)
  cells = grid(config)
  for seed in s.seeds:
    c = config.copy_and_resolve_references()
    c.seed = int(seed)
    fp = C.float_loader(c, s, int(seed), data, root)
    todo = [(Cell(f"{FLOAT}_s{seed}", FLOAT, FLOAT, 32.0, int(seed)), None)] + [
        (cell, C.ptq_cell if cell.quantizer in ("rtn", "gptq", "fair_gptq") else C.trained_cell)
        for cell in cells if cell.seed == seed]
    for cell, fn in todo:
      if _finished(root, cell.name):
        print(f"[study] {cell.name}: finished, skipped", flush=True)
        continue
      t0 = time.time()
      if fn is None:
        logits = predict_logits(C.model_for(c, data["test"]), fp(), data["test"], c.eval_batch_size)
        info = dict(avg_bits=32.0, run_dir=fp.cache["dir"])
      else:
        logits, info = fn(c, s, cell, fp, data, root)
      info.update(setting=cell.setting, quantizer=cell.quantizer, bits=cell.bits, seed=cell.seed,
                  seconds=time.time() - t0)
      _write_cell(root, cell.name, logits, data["test"], info)
      print(f"[study] {cell.name}: acc {np.mean(logits.argmax(-1) == data['test'].labels):.4f} "
            f"({info['seconds']:.1f} s)", flush=True)
  return study_report.write(s, root, cells, data["test"], config.dataset.positive_class)
