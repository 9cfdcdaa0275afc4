"""How each cell of the bias study is computed (`baq.study.bias.runner` runs the grid).

  * `FloatRun`: the seed's float model, trained once (or taken from a
    finished train.py workdir, `study.reuse`), and what every cell of the
    seed shares with it (its data, its Fair-GPTQ pairs).
  * `float_cell`: that float model's own test predictions.
  * `ptq_cell`: round-to-nearest, GPTQ or Fair-GPTQ of the float model on
    the per-channel grid (`baq.ptq.sequential`), calibrated on training
    examples drawn with the seed; Fair-GPTQ's pairs from `baq.study.bias.pairs`.
  * `trained_cell`: uniform QAT or BAQ fine-tuned from the float model by the
    trainer (`train`, resuming from its checkpoints), set up for evaluation by
    `create_train_state`, BAQ deployed at integer bits.
  * `numerics_cell`: a runtime's numerics (every method of kind "numerics"
    in `baq.quant.methods`: llm_int8, nf4, fp4, dynamic_int8, ...) on the
    float model, as the main job's runtime baselines.

Each cell function takes the Cell and the seed's FloatRun and returns the
test split's logits and what the cell's metrics.json records; `COMPUTE` maps
a method the study runs by name to its function, `KIND_COMPUTE` a kind of
method, all of whose methods it runs, and `compute` asks both.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import ml_collections
import numpy as np

from baq.allocation import projection
from baq.data.pipeline import normalize
from baq.models import build_model
from baq.ptq import sequential as gptq_model
from baq.quant import methods, units
from baq.study.bias import pairs
from baq.study.bias.resume import cell_config, conflicts
from baq.experiment import runtime_baselines
from baq import workdir as wd
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import predict_logits
from baq.train.modes import get_mode, run_steps
from baq.train.state import create_train_state
from baq.train.loop import train
from baq.variables import takes_train


class Cell(NamedTuple):
  """One run of the grid: `setting` at one seed (directory ROOT/<name>)."""
  name: str
  setting: str
  quantizer: str
  bits: float
  seed: int
  alpha: float = 0.0


def run_variables(run_dir: str) -> dict:
  """A run's variables with empty collections left out.

  Args:
    run_dir: a run directory with a checkpoint.

  Returns:
    {"params"[, "batch_stats"]} of its latest checkpoint.
  """
  return {k: v for k, v in restore_variables(run_dir).items() if k == "params" or v}


def reused_run(config: ml_collections.ConfigDict, s: ml_collections.ConfigDict, seed: int,
               sub: str, steps: int) -> str:
  """The finished run `sub` of the reuse workdir of this seed, or "".

  Args:
    config: the cell's config.
    s: the study options (`study.reuse`).
    seed: the cell's seed.
    sub: the run's name in that workdir (wd.FLOAT, wd.uniform_name(B), "baq").
    steps: the steps the run must have finished.

  Returns:
    The run directory, or "" when there is nothing to reuse.

  Raises:
    ValueError: the reuse workdir was trained on another model or data.
  """
  if not s.reuse:
    return ""
  base = s.reuse.format(seed=seed)
  path = wd.path(base, wd.CONFIG_FILE)
  if not os.path.exists(path) or not wd.finished(wd.path(base, sub), steps):
    return ""
  other = wd.read_json(path)
  mine, other = cell_config(config), cell_config(other)
  diff = conflicts({k: other[k] for k in ("model", "dataset")}, mine)
  if diff:
    raise ValueError(f"study.reuse {base}: its {diff} differ from this config's.")
  if sub == "baq" and float(other["quant"]["target_bits"]) != config.quant.target_bits:
    return ""
  return wd.path(base, sub)


class FloatRun:
  """The float model of one seed and what the seed's cells share.

  It is trained (or found in `study.reuse`) on the first call of
  `variables()`, so a seed whose cells are all finished trains nothing.

  Args:
    config: the seed's config (`config.seed` set).
    s: the study options.
    data: the splits.
    root: the study root.
  """

  def __init__(self, config: ml_collections.ConfigDict, s: ml_collections.ConfigDict,
               data: dict, root: str):
    self.config, self.s, self.data, self.root = config, s, data, root
    self.seed = int(config.seed)
    self.model = build_model(config.model.name, data["test"].num_classes, None,
                             **config.model.kwargs.to_dict())
    self._variables, self._pairs = None, None

  @functools.cached_property
  def run_dir(self) -> str:
    """The float run's directory: the reused one, or ROOT/fp32_s<S>/run."""
    return (reused_run(self.config, self.s, self.seed, wd.FLOAT, self.config.float_steps) or
            wd.path(self.root, wd.cell_name(wd.FLOAT, self.seed), wd.CELL_RUN))

  def variables(self) -> dict:
    """The float {"params"[, "batch_stats"]}, trained (or resumed) if unfinished."""
    if self._variables is None:
      c = self.config
      if not wd.finished(self.run_dir, c.float_steps):
        train(c, self.run_dir, mode="float", data=self.data, steps=c.float_steps,
              lr=c.optim.lr, use_penalties=False, name=wd.cell_name(wd.FLOAT, self.seed))
      self._variables = run_variables(self.run_dir)
    return self._variables

  def pairs(self) -> tuple[tuple, dict]:
    """Fair-GPTQ's (x_a, x_b) pairs and how they were made: one set per seed,
    shared by every alpha and budget (`pairs.fair_pairs`)."""
    if self._pairs is None:
      self._pairs = pairs.fair_pairs(self.config, self.s, self.data, self.model,
                                     self.variables(), self.seed)
    return self._pairs


def float_cell(cell: Cell, fp: FloatRun) -> tuple[np.ndarray, dict]:
  """The float model's own test predictions.

  Args:
    cell: the cell.
    fp: its seed's FloatRun.

  Returns:
    ([n, C] test logits, the record for the cell's metrics.json).
  """
  del cell
  logits = predict_logits(fp.model, fp.variables(), fp.data["test"], fp.config.eval_batch_size)
  return logits, dict(avg_bits=32.0, run_dir=fp.run_dir)


def ptq_cell(cell: Cell, fp: FloatRun) -> tuple[np.ndarray, dict]:
  """RTN, GPTQ or Fair-GPTQ of the seed's float model at `cell.bits`.

  Args:
    cell: the cell.
    fp: its seed's FloatRun.

  Returns:
    ([n, C] test logits, the record for the cell's metrics.json).
  """
  config, s, split = fp.config, fp.s, fp.data["train"]
  rng = np.random.default_rng([cell.seed, 1])
  calib = split.images[np.sort(rng.choice(len(split), min(s.calib_size, len(split)), False))]
  kw = dict(bits=int(cell.bits), method="rtn" if cell.quantizer == "rtn" else "gptq",
            batch_size=s.calib_batch, float_layers=config.quant.float_layers or ())
  info = dict(granularity="channel", calib_size=len(calib), alpha=cell.alpha)
  if cell.quantizer == "fair_gptq":
    kw["pairs"], how = fp.pairs()
    kw.update(alpha=cell.alpha, fair_layers=s.fair_layers)
    info.update(how)
  apply_kwargs = {"train": False} if takes_train(type(fp.model)) else None
  params, rec = gptq_model.quantize_model(fp.model, fp.variables(), normalize(calib),
                                          apply_kwargs=apply_kwargs, **kw,
                                          **s.gptq_kwargs.to_dict())
  info.update(avg_bits=cell.bits, calib_err=sum(r["err"] for r in rec.values()),
              calib_err_rtn=sum(r["err_rtn"] for r in rec.values()))
  return predict_logits(fp.model, dict(fp.variables(), params=params), fp.data["test"],
                        config.eval_batch_size), info


def trained_cell(cell: Cell, fp: FloatRun) -> tuple[np.ndarray, dict]:
  """Uniform QAT or BAQ at `cell.bits`, fine-tuned from the seed's float model.

  Args:
    cell: the cell.
    fp: its seed's FloatRun.

  Returns:
    ([n, C] test logits, the record for the cell's metrics.json).
  """
  c = fp.config.copy_and_resolve_references()
  if cell.quantizer == "baq":
    c.quant.target_bits = cell.bits
  sub = wd.method_name(c, "baq") if cell.quantizer == "baq" else wd.uniform_name(cell.bits)
  steps = run_steps(c, get_mode(c, cell.quantizer, cell.bits))
  run_dir = (reused_run(c, fp.s, cell.seed, sub, steps) or
             wd.path(fp.root, cell.name, wd.CELL_RUN))
  run = dict(mode=cell.quantizer, bits=cell.bits, steps=steps, lr=c.optim.finetune_lr,
             use_penalties=cell.quantizer == "baq")
  if not wd.finished(run_dir, steps):
    train(c, run_dir, data=fp.data, init_variables=fp.variables(), name=cell.name, **run)
  split = fp.data["train"]
  setup = create_train_state(c, num_classes=split.num_classes, num_groups=split.num_groups,
                             image_shape=split.images.shape[1:], **run)
  variables = run_variables(run_dir)
  params = variables["params"]
  if cell.quantizer == "baq":
    _, params = projection.deploy(params, setup.layers, setup.budget, c.quant.min_bits,
                              c.quant.max_bits)
  info = dict(avg_bits=float(units.average_bits(params, setup.layers)), run_dir=run_dir,
              granularity=c.quant.granularity, steps=steps)
  return predict_logits(setup.eval_model, dict(variables, params=params), fp.data["test"],
                        c.eval_batch_size), info


def numerics_cell(cell: Cell, fp: FloatRun) -> tuple[np.ndarray, dict]:
  """A runtime's numerics (`cell.quantizer`, e.g. nf4) on the float model's Dense layers,
  as the main job's runtime baseline (`baq.experiment.runtime_baselines`, its bits and size).

  Returns:
    ([n, C] test logits, the record for the cell's metrics.json).
  """
  test, variables = fp.data["test"], fp.variables()
  model = runtime_baselines.model(fp.config, cell.quantizer, test.num_classes)
  info = runtime_baselines.storage(fp.config, cell.quantizer, model, variables,
                                   np.zeros((1,) + test.images.shape[1:], np.float32))
  return predict_logits(model, variables, test, fp.config.eval_batch_size), info


# method -> how its cell is computed (wd.FLOAT: the float model itself).
COMPUTE = {wd.FLOAT: float_cell, "rtn": ptq_cell, "gptq": ptq_cell, "fair_gptq": ptq_cell,
           "qat": trained_cell, "baq": trained_cell}
# kind of method -> how a cell of any method of that kind is computed.
KIND_COMPUTE = {"numerics": numerics_cell}
# The quantizers of `study.quantizers` (the float model is every seed's own cell).
QUANTIZERS = methods.Choices("bias study quantizer", [n for n in COMPUTE if n != wd.FLOAT],
                             tuple(KIND_COMPUTE))


def compute(quantizer: str):
  """The cell function of a method (`baq.quant.methods`) the study runs.

  Raises:
    KeyError: the study does not run it (the message lists those it runs).
  """
  method = methods.get(quantizer) if quantizer == wd.FLOAT else QUANTIZERS.get(quantizer)
  return COMPUTE.get(method.name) or KIND_COMPUTE[method.kind]
