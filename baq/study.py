"""The bias study: quantizers x bit budgets x seeds, then per-group statistics.

  python benchmarks/bias_study.py --config=configs/bias_study.py --root=/tmp/baq_study

`run_study(config, root)` runs every cell of the grid that is not finished,
then `baq.study_report` compares each quantized setting with the float model
of the same seed on the same test examples (baq.stats) and writes
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
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from baq import experiment, stats, study_report
from baq import metrics as M
from baq.checkpoint import restore_variables
from baq.data import datasets
from baq.data.pipeline import normalize
from baq.evaluate import apply_model, predict_logits, takes_train
from baq.models import build_model
from baq.modes import get_mode
from baq.quant import export, gptq_model as GM, units as U
from baq.trainer import target_bits, train

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
FLOAT = "fp32"


class Cell(NamedTuple):
  """One run of the grid: `setting` at one seed (directory ROOT/<name>)."""
  name: str
  setting: str
  quantizer: str
  bits: float
  seed: int
  alpha: float = 0.0


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


def _latest_step(workdir: str) -> int:
  d = os.path.join(workdir, "checkpoints")
  steps = [int(x) for x in os.listdir(d) if x.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=-1)


def _reused(config, s, seed: int, sub: str, steps: int) -> str:
  """The finished run `sub` of the reuse workdir of this seed, or ""."""
  if not s.reuse:
    return ""
  base = s.reuse.format(seed=seed)
  path = os.path.join(base, "config.json")
  if not os.path.exists(path) or _latest_step(os.path.join(base, sub)) != steps:
    return ""
  with open(path) as f:
    other = json.load(f)
  mine, other = _cell_config(config), _cell_config(other)
  diff = _conflicts({k: other[k] for k in ("model", "dataset")}, mine)
  if diff:
    raise ValueError(f"study.reuse {base}: its {diff} differ from this config's.")
  if sub == "baq" and float(other["quant"]["target_bits"]) != config.quant.target_bits:
    return ""
  return os.path.join(base, sub)


def _model(config, test, quantizer=None):
  return build_model(config.model.name, test.num_classes, quantizer,
                     **config.model.kwargs.to_dict())


def penultimate_features(model: nn.Module, variables: Any, x: np.ndarray,
                         batch_size: int = 256) -> np.ndarray:
  """[n, d] inputs of the model's last Dense/Conv call (the head's features)."""
  def features(xb):
    seen = []

    def grab(fn, args, kwargs, context):
      if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
        seen.append(args[0] if args else kwargs["inputs"])
      return fn(*args, **kwargs)

    with nn.intercept_methods(grab):
      apply_model(model, variables, xb)
    return seen[-1].reshape(xb.shape[0], -1)
  run = jax.jit(features)
  return np.concatenate([np.asarray(run(x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)])


def fair_pairs(config, s, data: dict, model, variables, seed: int) -> tuple[tuple, dict]:
  """Fair-GPTQ's aligned pair batches (x_a, x_b), normalised, and how they were made."""
  train_split = data["train"]
  count = np.bincount(train_split.groups, minlength=train_split.num_groups)
  ref = int(np.argmax(count)) if s.pair_reference < 0 else int(s.pair_reference)
  others = [g for g in range(train_split.num_groups) if g != ref and count[g]]
  per = max(1, s.num_pairs // max(len(others), 1))
  how = s.pairs if s.pairs != "auto" else (
      "counterfactual" if config.dataset.name == "synthetic_derm" else "penultimate")
  rng = np.random.default_rng([seed, 2])
  xa, xb = [], []
  if how == "counterfactual":
    for g in others:
      idx = np.sort(rng.choice(len(train_split), per, replace=False))
      cf = datasets.counterfactual_pairs(config.dataset.train_split, (g, ref), idx,
                                         **config.dataset.kwargs.to_dict())
      xa.append(cf["image"][0])
      xb.append(cf["image"][1])
  else:
    pool = np.sort(rng.choice(len(train_split), min(s.pair_pool, len(train_split)), False))
    images = train_split.images[pool]
    feats = (penultimate_features(model, variables, normalize(images), s.calib_batch)
             if how == "penultimate" else images)
    for g in others:
      ia, ib = GM.match_pairs(feats, train_split.labels[pool], train_split.groups[pool], g, ref)
      keep = np.sort(rng.permutation(len(ia))[:per])
      xa.append(images[ia[keep]])
      xb.append(images[ib[keep]])
  xa, xb = np.concatenate(xa), np.concatenate(xb)
  return (normalize(xa), normalize(xb)), dict(pairs=how, pair_reference=ref,
                                               num_pairs=len(xa), pair_groups=others)


def _ptq(config, s, cell: Cell, fp: Callable, data: dict, root: str) -> tuple:
  del root
  model = _model(config, data["test"])
  rng = np.random.default_rng([cell.seed, 1])
  calib = data["train"].images[np.sort(rng.choice(len(data["train"]),
                                                  min(s.calib_size, len(data["train"])), False))]
  kw = dict(bits=int(cell.bits), method="rtn" if cell.quantizer == "rtn" else "gptq",
            batch_size=s.calib_batch, float_layers=config.quant.float_layers or ())
  info = dict(granularity="channel", calib_size=len(calib), alpha=cell.alpha)
  if cell.quantizer == "fair_gptq":
    if "pairs" not in fp.cache:  # one set per seed, shared by every alpha and budget
      fp.cache["pairs"] = fair_pairs(config, s, data, model, fp(), cell.seed)
    kw["pairs"], how = fp.cache["pairs"]
    kw.update(alpha=cell.alpha, fair_layers=s.fair_layers)
    info.update(how)
  apply_kwargs = {"train": False} if takes_train(type(model)) else None
  params, rec = GM.quantize_model(model, fp(), normalize(calib), apply_kwargs=apply_kwargs,
                                  **kw, **s.gptq_kwargs.to_dict())
  info.update(avg_bits=cell.bits, calib_err=sum(r["err"] for r in rec.values()),
              calib_err_rtn=sum(r["err_rtn"] for r in rec.values()))
  return predict_logits(model, dict(fp(), params=params), data["test"],
                        config.eval_batch_size), info


def _trained(config, s, cell: Cell, fp: Callable, data: dict, root: str) -> tuple:
  c = config.copy_and_resolve_references()
  if cell.quantizer == "baq":
    c.quant.target_bits = cell.bits
  sub = "baq" if cell.quantizer == "baq" else f"uniform{cell.bits:g}"
  run_dir = _reused(c, s, cell.seed, sub, c.steps)
  run_dir = run_dir or os.path.join(root, cell.name, "run")
  if _latest_step(run_dir) != c.steps:
    train(c, run_dir, mode=cell.quantizer, bits=cell.bits, data=data, steps=c.steps,
          lr=c.optim.finetune_lr, init_variables=fp(), use_penalties=cell.quantizer == "baq",
          name=cell.name)
  spec = get_mode(c, cell.quantizer, cell.bits)
  model = _model(c, data["test"], spec.quantizer.replace(training=False))
  variables = _variables(run_dir)
  params = variables["params"]
  layers = U.find_units(params)
  if cell.quantizer == "baq":
    _, params = export.deploy(params, layers, target_bits(c, params, layers),
                              c.quant.min_bits, c.quant.max_bits)
  info = dict(avg_bits=float(U.average_bits(params, layers)), run_dir=run_dir,
              granularity=c.quant.granularity, steps=c.steps)
  return predict_logits(model, dict(variables, params=params), data["test"],
                        c.eval_batch_size), info


def _variables(run_dir: str) -> dict:
  """A run's {"params"[, "batch_stats"]} (empty collections left out)."""
  return {k: v for k, v in restore_variables(run_dir).items() if k == "params" or v}


def _float_variables(config, s, seed: int, data: dict, root: str) -> Callable:
  """A loader of the seed's float variables: trained (or reused) on first call.

  Its `cache` dict also keeps what every cell of the seed shares (run_dir,
  Fair-GPTQ's pairs).
  """
  cache = {}

  def load():
    if "p" not in cache:
      run_dir = _reused(config, s, seed, FLOAT, config.float_steps)
      if not run_dir:
        run_dir = os.path.join(root, f"{FLOAT}_s{seed}", "run")
      if _latest_step(run_dir) != config.float_steps:
        train(config, run_dir, mode="float", data=data, steps=config.float_steps,
              lr=config.optim.lr, use_penalties=False, name=f"{FLOAT}_s{seed}")
      cache["p"], cache["dir"] = _variables(run_dir), run_dir
    return cache["p"]
  load.cache = cache
  return load


# Fields that change no cell's predictions: they may differ when a study resumes.
_NOT_IN_CELLS = ("study", "diagnostics", "imports", "log_every", "eval_every",
                 "checkpoint_every", "eval_batch_size")


def _cell_config(config) -> dict:
  """What the cells depend on, as JSON: the config less _NOT_IN_CELLS and data_dir."""
  c = config if isinstance(config, dict) else json.loads(config.to_json())
  c = {k: v for k, v in c.items() if k not in _NOT_IN_CELLS}
  c["dataset"] = {k: v for k, v in c["dataset"].items() if k != "data_dir"}
  return c


def _conflicts(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted fields both configs hold with different values.

  A field only one of them holds is newer code, not a different experiment.
  """
  out = []
  for k in sorted(set(old) & set(new)):
    a, b = old[k], new[k]
    if isinstance(a, dict) and isinstance(b, dict):
      out += _conflicts(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(prefix + k)
  return out


def _check_root(config, root: str) -> None:
  """Refuses a root whose cells were made with another config (study options may change)."""
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      diff = _conflicts(_cell_config(json.load(f)), _cell_config(config))
    if diff:
      raise ValueError(f"{root} holds a study made with another config (differs in {diff}); "
                       "use a fresh --root, or only change the `study` options.")


def run_study(config: ml_collections.ConfigDict, root: str, data: dict | None = None) -> dict:
  """Runs the unfinished cells of the grid, then analyzes all of them.

  Returns:
    The study dict written to ROOT/study.json (`study_report.analyze`).
  """
  experiment.validate(config)
  s = settings(config)
  _check_root(config, root)
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(config.to_json(indent=1))
  data = data or experiment.load_data(config)
  cells = grid(config)
  for seed in s.seeds:
    c = config.copy_and_resolve_references()
    c.seed = int(seed)
    fp = _float_variables(c, s, int(seed), data, root)
    todo = [(Cell(f"{FLOAT}_s{seed}", FLOAT, FLOAT, 32.0, int(seed)), None)] + [
        (cell, _ptq if cell.quantizer in ("rtn", "gptq", "fair_gptq") else _trained)
        for cell in cells if cell.seed == seed]
    for cell, fn in todo:
      if _finished(root, cell.name):
        print(f"[study] {cell.name}: finished, skipped", flush=True)
        continue
      t0 = time.time()
      if fn is None:
        logits = predict_logits(_model(c, data["test"]), fp(), data["test"], c.eval_batch_size)
        info = dict(avg_bits=32.0, run_dir=fp.cache["dir"])
      else:
        logits, info = fn(c, s, cell, fp, data, root)
      info.update(setting=cell.setting, quantizer=cell.quantizer, bits=cell.bits, seed=cell.seed,
                  seconds=time.time() - t0)
      _write_cell(root, cell.name, logits, data["test"], info)
      print(f"[study] {cell.name}: acc {np.mean(logits.argmax(-1) == data['test'].labels):.4f} "
            f"({info['seconds']:.1f} s)", flush=True)
  return study_report.write(s, root, cells, data["test"], config.dataset.positive_class)
