"""The trainer's loop: one run of one mode in its workdir, resumable.

As in the flax examples the work is split in three: `state.create_train_state`
builds the model, optimizer, penalties and step-0 state; `step.make_train_step`
makes the update; `train` only places them on the mesh, restores, and runs
the loop (batches, logging, validation, checkpoints). The batch of step s is
a pure function of (seed, s), so a run restored at step s continues exactly
as an uninterrupted run would. The step is one `jax.jit` over the mesh of
`config.mesh` with the state sharded by `baq.train.sharding`'s rules and the
batch split over "data"; on several hosts each process feeds its rows of the
batch and only process 0 writes metrics. The loss is checked for non-finite
values before every checkpoint and log line: a bad step stops the run with a
message and the last good checkpoint stays as it was.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq import launch
from baq.data.pipeline import Batcher, batches, recipe
from baq.quant import units
from baq.quant.inject import QUANT_LEAF_PATTERN
from baq.train import progress, rounding, sharding as sh
from baq import workdir as wd
from baq.train.checkpoint import Checkpointer
from baq.train.evaluate import evaluate_split
from baq.train.state import TrainSetup, create_train_state
from baq.train.step import make_train_step

GROUP_WEIGHTINGS = ("none", "inverse_frequency", "sqrt_inverse_frequency")
# The quantizer's own leaves stay replicated; the rest follows the mesh rules.
SHARDING_RULES = ((QUANT_LEAF_PATTERN, sh.REPLICATED),) + sh.RULES


@dataclasses.dataclass
class RunResult:
  """What a finished run hands back.

  Attributes:
    params: final parameters (continuous bit-widths for BAQ).
    model: the training-mode model.
    mode: the ModeSpec used.
    workdir: the run's directory.
    batch_stats: final BatchNorm statistics (empty without BatchNorm).
  """

  params: Any
  model: Any
  mode: Any
  workdir: str
  batch_stats: Any = dataclasses.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    """{"params", "batch_stats"}, to evaluate the model with."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def group_loss_weights(kind: str, groups: np.ndarray, num_groups: int) -> Optional[np.ndarray]:
  """[G] weights of the task loss per group, None for "none".

  "inverse_frequency" gives w_g = N / (G n_g), so every group contributes
  equally to the loss and the mean weight over training examples is 1;
  "sqrt_inverse_frequency" is its square root, renormalised the same way.
  """
  if kind not in GROUP_WEIGHTINGS:
    raise ValueError(f"Unknown group weighting {kind!r}. Valid: {', '.join(GROUP_WEIGHTINGS)}.")
  if kind == "none":
    return None
  n = np.bincount(groups, minlength=num_groups).astype(np.float64)
  w = np.where(n > 0, 1.0 / np.maximum(n, 1), 0.0)
  if kind == "sqrt_inverse_frequency":
    w = np.sqrt(w)
  return (w * n.sum() / np.sum(w * n)).astype(np.float32)


def jit_steps(config: ml_collections.ConfigDict, setup: TrainSetup, mesh, shardings, *,
              num_groups: int, group_weights=None) -> tuple:
  """The run's two jitted steps over the mesh: (search step, final step).

  The final step trains the deployed model (integer bits, frozen): the last
  phase of a bit-training run; other runs only use the first.
  """
  # Only trained bit-widths are clipped to [min_bits, max_bits]: a uniform
  # baseline's (e.g. uniform16) or an allocation's stay as they are.
  bounds = (config.quant.min_bits, config.quant.max_bits) if setup.spec.train_bits else None
  kw = dict(num_groups=num_groups, budget=setup.budget, group_weights=group_weights,
            bit_bounds=bounds)
  search = make_train_step(setup.model, setup.tx, setup.penalties, setup.layers, **kw)
  final = make_train_step(setup.eval_model, setup.final_tx or setup.tx, setup.penalties,
                          setup.layers, freeze_bits=True, **kw)
  return sh.jit_step(search, mesh, shardings), sh.jit_step(final, mesh, shardings)


# Over 60 lines by its docstring; the body is set-up (three calls) and the loop.
def train(config: ml_collections.ConfigDict, workdir: str, *, mode: str, data: dict,
          steps: int, lr: float, bits: Optional[float] = None,
          init_params: Optional[dict] = None, use_penalties: bool = True,
          name: Optional[str] = None, init_bits: Optional[np.ndarray] = None,
          init_variables: Optional[dict] = None) -> RunResult:
  """Trains one mode in `workdir`, resuming from its latest checkpoint.

  Args:
    config: the experiment config.
    workdir: this run's directory (checkpoints, metrics.jsonl).
    mode: a registered mode, e.g. "float", "qat" or "baq" (see baq.train.modes).
    data: dict with "train" and "validation" `Split`s.
    steps: total training steps.
    lr: peak learning rate of the weights.
    bits: bit-width of mode "qat".
    init_params: parameters to start from, for models without BatchNorm
      (else use `init_variables`).
    use_penalties: add `config.penalties` to the loss.
    name: label for progress lines.
    init_bits: integer bit-widths to start from, one per unit (an
      allocation); otherwise the mode's own start.
    init_variables: {"params", "batch_stats"} to start from (e.g. the float
      model's, `checkpoint.restore_variables`).

  Returns:
    A RunResult with the final parameters and BatchNorm statistics.
  """
  if init_params is not None and init_variables is not None:
    raise ValueError("Pass init_params or init_variables, not both.")
  name = name or mode
  launch.initialize_distributed()  # idempotent: for callers that skip launch.start
  mesh = sh.make_mesh(config)
  split = data["train"]
  setup = create_train_state(
      config, mode, num_classes=split.num_classes, num_groups=split.num_groups,
      image_shape=split.images.shape[1:], steps=steps, lr=lr, bits=bits,
      use_penalties=use_penalties, init_bits=init_bits,
      init_variables=init_params if init_variables is None else init_variables)
  shardings = sh.state_shardings(mesh, setup.state, config, SHARDING_RULES)
  ckpt = Checkpointer(workdir, sh.abstract(setup.state, shardings))
  state = _restore_or_place(ckpt, setup.state, shardings, name, workdir)
  weights = group_loss_weights(config.get("group_weighting", "none"), split.groups,
                               split.num_groups)
  search_step, final_step = jit_steps(config, setup, mesh, shardings,
                                      num_groups=split.num_groups, group_weights=weights)
  final_at = finalize_step(config, setup.spec, steps)
  stream = bool(config.dataset.get("stream", False))  # each host reads its own rows
  batcher = Batcher(split, config.batch_size, seed=config.seed,
                    sampling=config.dataset.sampling, flip=config.dataset.flip,
                    augment=recipe(config.dataset),
                    rows=sh.process_rows(sh.batch_sharding(mesh), config.batch_size)
                    if stream else None)
  writer = progress.MetricWriter(workdir, name, tensorboard=config.get("tensorboard", False),
                                 group_names=split.group_names)
  history = []
  last_saved, t0 = ckpt.latest_step(), time.time()
  step = int(state["step"])
  feed = batches(batcher, step, steps, int(config.dataset.get("workers", 0)))
  try:
    if steps == 0 and last_saved is None:  # post-training only: keep the result
      ckpt.save(0, state, force=True)
    while step < steps:
      if step == final_at:
        state = sh.put(_finalize(state, setup, config, name, workdir, split), shardings)
      step_fn = final_step if step >= final_at else search_step
      batch = next(feed)
      state, metrics = step_fn(state, sh.shard_local_batch(batch, config.batch_size, mesh)
                               if stream else sh.shard_batch(batch, mesh))
      history.append(metrics)
      step += 1
      log_now = step % config.log_every == 0 or step == steps
      save_now = step % config.checkpoint_every == 0 or step == steps
      if log_now or save_now:
        progress.check_finite(history, workdir, last_saved)
      if log_now:
        on_val = step % config.eval_every == 0 or step == steps
        writer.write(step, _log_summary(history, t0, setup, state, data, config, on_val),
                     bits=_unit_bits(state) if writer.wants_bits else None)
        history, t0 = [], time.time()
      if save_now:
        ckpt.save(step, state)
        last_saved = step
  finally:
    feed.close()
    ckpt.close()
    writer.close()
  return RunResult(state["params"], setup.model, setup.spec, workdir, state["batch_stats"])


def _restore_or_place(ckpt: Checkpointer, state: dict, shardings, name: str,
                      workdir: str) -> dict:
  """The latest checkpoint restored onto `shardings`, else `state` placed on them."""
  if ckpt.latest_step() is None:
    return sh.put(state, shardings)
  state = ckpt.restore()  # onto this run's shardings, whatever layout saved it
  if launch.is_primary():
    print(f"[{name}] resumed from step {int(state['step'])} in {workdir}", flush=True)
  return state


def _log_summary(history: list, t0: float, setup: TrainSetup, state: dict, data: dict,
                 config: ml_collections.ConfigDict, on_val: bool) -> dict:
  """The logged means since the last line, with validation accuracy when asked."""
  summary = progress.summarise(history)
  summary["steps_per_s"] = len(history) / max(time.time() - t0, 1e-9)
  if on_val:
    val = evaluate_split(setup.eval_model, _variables(state), data["validation"],
                         config.eval_batch_size)
    summary.update(val_acc=val["accuracy"], val_worst_group_acc=val["worst_group_accuracy"],
                   val_group_acc=[np.nan if a is None else a for a in val["group_accuracy"]])
  return summary


def _unit_bits(state: dict) -> Optional[np.ndarray]:
  """Every unit's bit-width (None for a float model), for the histogram."""
  layers = units.find_units(state["params"])
  return np.asarray(jax.device_get(units.gather_bits(state["params"], layers))) if layers \
      else None


def _variables(state: dict) -> dict:
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def finalize_step(config: ml_collections.ConfigDict, spec, steps: int) -> float:
  """The step from which a bit-training run trains at its integer allocation.

  With `config.quant.search_steps` it is that step (the run's `steps` then
  include the search, see `modes.run_steps`); otherwise the last
  `config.quant.finalize_fraction` of the steps train the weights with the
  bit-widths projected onto the budget at integer values and frozen, with
  the quantizer that evaluation and export use; inf when no bits train.
  """
  if not spec.train_bits:
    return float("inf")
  if config.quant.get("search_steps") is not None:
    return int(config.quant.search_steps)
  frac = config.quant.get("finalize_fraction", 0.0) or 0.0
  if frac <= 0:
    return float("inf")
  return steps - max(1, int(round(frac * steps)))


def _finalize(state: dict, setup: TrainSetup, config, name: str, workdir: str,
              split) -> dict:
  """Projects the bit-widths onto the budget at integers (host side, once; see
  `baq.train.rounding`, which calibrates on `split` when it measures).

  The searched continuous bit-widths are kept in WORKDIR/searched_bits.json
  (the train state holds the integers from here on).
  """
  params, layers, target = sh.to_host(state["params"]), setup.layers, setup.budget
  cont = np.asarray(units.gather_bits(params, layers), np.float64)
  if launch.is_primary():
    wd.write_json(os.path.join(workdir, wd.SEARCHED_BITS_FILE),
                  dict(step=int(state["step"]), units=units.unit_names(layers),
                       bits=cont.tolist()), indent=None)
  params = rounding.integer_params(config, setup, params, sh.to_host(state["batch_stats"]),
                                  split)
  avg = float(units.average_bits(params, layers))
  if launch.is_primary():
    print(f"[{name}] step {int(state['step']):5d} bit-widths projected to integers: "
          f"avg_bits={avg:.4g} (target {target:.4g}); training the weights at them", flush=True)
  params = jax.tree.map(jnp.asarray, params)
  if setup.final_tx is None or setup.final_tx is setup.tx:
    return dict(state, params=params)
  return dict(state, params=params, opt_state=setup.final_tx.init(params))  # a fresh start


def searched_params(workdir: str, params: Any, layers) -> Any:
  """`params` with the continuous bit-widths the run searched, if it saved them."""
  path = os.path.join(workdir, wd.SEARCHED_BITS_FILE)
  if not os.path.exists(path):
    return params
  saved = wd.read_json(path)
  if saved["units"] != units.unit_names(layers):
    raise ValueError(f"{path} does not match this model's bit-width units.")
  return units.scatter_bits(params, layers, np.asarray(saved["bits"]))
