"""How each cell of the bias study is computed (`baq.study.runner` runs the grid).

  * `float_loader`: the seed's float model, trained once (or taken from a
    finished train.py workdir, `study.reuse`) and shared by the seed's cells.
  * `ptq_cell`: round-to-nearest, GPTQ or Fair-GPTQ of that float model on
    the per-channel grid (`baq.quant.gptq_model`), calibrated on training
    examples drawn with the seed; Fair-GPTQ's pairs from `baq.study.pairs`.
  * `trained_cell`: uniform QAT or BAQ fine-tuned from the float model by the
    trainer (resuming from its checkpoints), BAQ deployed at integer bits.

Each returns the test split's logits and what the cell's metrics.json records.
"""

from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple

import numpy as np

from baq.study import pairs
from baq.train.checkpoint import restore_variables
from baq.data.pipeline import normalize
from baq.train.evaluate import predict_logits
from baq.variables import takes_train
from baq.models import build_model
from baq.train.modes import get_mode
from baq.quant import export, gptq_model as GM, units as U
from baq.train.modes import budget_bits
from baq.train.trainer import train

FLOAT = "fp32"


class Cell(NamedTuple):
  """One run of the grid: `setting` at one seed (directory ROOT/<name>)."""
  name: str
  setting: str
  quantizer: str
  bits: float
  seed: int
  alpha: float = 0.0


def model_for(config, test, quantizer=None):
  return build_model(config.model.name, test.num_classes, quantizer,
                     **config.model.kwargs.to_dict())


def run_variables(run_dir: str) -> dict:
  """A run's {"params"[, "batch_stats"]} (empty collections left out)."""
  return {k: v for k, v in restore_variables(run_dir).items() if k == "params" or v}


def latest_step(workdir: str) -> int:
  d = os.path.join(workdir, "checkpoints")
  steps = [int(x) for x in os.listdir(d) if x.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=-1)


def reused_run(config, s, seed: int, sub: str, steps: int) -> str:
  """The finished run `sub` of the reuse workdir of this seed, or ""."""
  if not s.reuse:
    return ""
  base = s.reuse.format(seed=seed)
  path = os.path.join(base, "config.json")
  if not os.path.exists(path) or latest_step(os.path.join(base, sub)) != steps:
    return ""
  with open(path) as f:
    other = json.load(f)
  mine, other = cell_config(config), cell_config(other)
  diff = conflicts({k: other[k] for k in ("model", "dataset")}, mine)
  if diff:
    raise ValueError(f"study.reuse {base}: its {diff} differ from this config's.")
  if sub == "baq" and float(other["quant"]["target_bits"]) != config.quant.target_bits:
    return ""
  return os.path.join(base, sub)


def float_loader(config, s, seed: int, data: dict, root: str) -> Callable:
  """A loader of the seed's float variables: trained (or reused) on first call.

  Its `cache` dict also keeps what every cell of the seed shares (run_dir,
  Fair-GPTQ's pairs).
  """
  cache = {}

  def load():
    if "p" not in cache:
      run_dir = reused_run(config, s, seed, FLOAT, config.float_steps)
      if not run_dir:
        run_dir = os.path.join(root, f"{FLOAT}_s{seed}", "run")
      if latest_step(run_dir) != config.float_steps:
        train(config, run_dir, mode="float", data=data, steps=config.float_steps,
              lr=config.optim.lr, use_penalties=False, name=f"{FLOAT}_s{seed}")
      cache["p"], cache["dir"] = run_variables(run_dir), run_dir
    return cache["p"]
  load.cache = cache
  return load


def ptq_cell(config, s, cell: Cell, fp: Callable, data: dict, root: str) -> tuple:
  del root
  model = model_for(config, data["test"])
  rng = np.random.default_rng([cell.seed, 1])
  calib = data["train"].images[np.sort(rng.choice(len(data["train"]),
                                                  min(s.calib_size, len(data["train"])), False))]
  kw = dict(bits=int(cell.bits), method="rtn" if cell.quantizer == "rtn" else "gptq",
            batch_size=s.calib_batch, float_layers=config.quant.float_layers or ())
  info = dict(granularity="channel", calib_size=len(calib), alpha=cell.alpha)
  if cell.quantizer == "fair_gptq":
    if "pairs" not in fp.cache:  # one set per seed, shared by every alpha and budget
      fp.cache["pairs"] = pairs.fair_pairs(config, s, data, model, fp(), cell.seed)
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


def trained_cell(config, s, cell: Cell, fp: Callable, data: dict, root: str) -> tuple:
  c = config.copy_and_resolve_references()
  if cell.quantizer == "baq":
    c.quant.target_bits = cell.bits
  sub = "baq" if cell.quantizer == "baq" else f"uniform{cell.bits:g}"
  run_dir = reused_run(c, s, cell.seed, sub, c.steps)
  run_dir = run_dir or os.path.join(root, cell.name, "run")
  if latest_step(run_dir) != c.steps:
    train(c, run_dir, mode=cell.quantizer, bits=cell.bits, data=data, steps=c.steps,
          lr=c.optim.finetune_lr, init_variables=fp(), use_penalties=cell.quantizer == "baq",
          name=cell.name)
  spec = get_mode(c, cell.quantizer, cell.bits)
  model = model_for(c, data["test"], spec.quantizer.replace(training=False))
  variables = run_variables(run_dir)
  params = variables["params"]
  layers = U.find_units(params)
  if cell.quantizer == "baq":
    _, params = export.deploy(params, layers, budget_bits(c, params, layers),
                              c.quant.min_bits, c.quant.max_bits)
  info = dict(avg_bits=float(U.average_bits(params, layers)), run_dir=run_dir,
              granularity=c.quant.granularity, steps=c.steps)
  return predict_logits(model, dict(variables, params=params), data["test"],
                        c.eval_batch_size), info


# Fields that change no cell's predictions: they may differ when a study resumes.
NOT_IN_CELLS = ("study", "diagnostics", "imports", "log_every", "eval_every",
                 "checkpoint_every", "eval_batch_size")


def cell_config(config) -> dict:
  """What the cells depend on, as JSON: the config less NOT_IN_CELLS and data_dir.

  A manual directory is compared as a real path, so "../shared/x" given to
  train.py and "/work/shared/x" given to the study are the same data.
  """
  c = config if isinstance(config, dict) else json.loads(config.to_json())
  c = {k: v for k, v in c.items() if k not in NOT_IN_CELLS}
  c["dataset"] = {k: v for k, v in c["dataset"].items() if k != "data_dir"}
  kwargs = c["dataset"].get("kwargs")
  if isinstance(kwargs, dict) and isinstance(kwargs.get("manual_dir"), str):
    c["dataset"]["kwargs"] = dict(kwargs, manual_dir=os.path.realpath(kwargs["manual_dir"]))
  return c


def conflicts(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted fields both configs hold with different values.

  A field only one of them holds is newer code, not a different experiment.
  """
  out = []
  for k in sorted(set(old) & set(new)):
    a, b = old[k], new[k]
    if isinstance(a, dict) and isinstance(b, dict):
      out += conflicts(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(prefix + k)
  return out
