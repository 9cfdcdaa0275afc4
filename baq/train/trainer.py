"""The trainer: one run of one mode (float, uniform QAT or BAQ) in a workdir.

Sections: model and quantizer, parameters, optimizer, penalties, the update
step, sharding, checkpoint, loop. The train state is a plain dict (step,
params, batch_stats, opt_state, penalty_state, rng, data position;
batch_stats is empty for models without BatchNorm); the batch of step s is a
pure function of (seed, s), so a run restored at step s continues exactly as
an uninterrupted run would. The step is one `jax.jit` over the mesh of
`config.mesh` with the state sharded by `baq.train.sharding`'s rules and the batch
split over "data"; on several hosts each process feeds its rows of the
batch and only process 0 writes metrics. The loss is checked for non-finite
values before every checkpoint and log line: a bad step stops the run with a
message and the last good checkpoint stays as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from baq.fairness import losses, regularizers
from baq.train import sharding as sh
from baq.train.checkpoint import Checkpointer
from baq.data.pipeline import Batcher
from baq.train.evaluate import apply_model, as_variables, evaluate_split
from baq.models import build_model
from baq.train.modes import get_mode
from baq.quant import units as U
from baq.quant.inject import BITS_LEAF, RANGE_LEAF

SEARCHED_BITS_FILE = "searched_bits.json"


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


def merge_params(init: dict, source: dict) -> dict:
  """`init` with every leaf that `source` has at the same path and shape.

  Used to start a quantized model (which has extra bit-width leaves) from a
  float checkpoint.
  """
  flat_init = tu.flatten_dict(dict(init))
  flat_src = tu.flatten_dict(dict(source))
  missing = [k for k in flat_init if k not in flat_src and k[-1] not in (BITS_LEAF, RANGE_LEAF)]
  if missing:
    raise ValueError(f"Checkpoint to start from lacks {['/'.join(k) for k in missing][:4]}.")
  for k, v in flat_src.items():
    if k in flat_init and np.shape(v) == np.shape(flat_init[k]):
      flat_init[k] = jnp.array(v)  # a copy: the new run donates its buffers
  return tu.unflatten_dict(flat_init)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, *, lr: float,
                   steps: int, train_bits: bool) -> optax.GradientTransformation:
  """AdamW with warmup-cosine for weights; plain Adam (or frozen) for bit-widths.

  Bit-width leaves are found by name, so any model gets the right optimizer.
  """
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, min(o.warmup_steps, max(steps // 10, 1)), max(steps, 2))
  weights = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                        optax.adamw(schedule, weight_decay=o.weight_decay))
  bits = optax.adam(o.bits_lr) if train_bits else optax.set_to_zero()
  labels = tu.path_aware_map(
      lambda path, _: "bits" if path[-1] == BITS_LEAF else "weights", params)
  return optax.multi_transform({"weights": weights, "bits": bits}, labels)


def build_penalties(config: ml_collections.ConfigDict, train_bits: bool) -> dict:
  """name -> (Regularizer, weight) from `config.penalties`.

  Penalties of the bit-widths (e.g. `bitrate`) apply only when bits train.
  """
  out = {}
  for name, entry in sorted(config.penalties.to_dict().items()):
    entry = dict(entry)
    weight = float(entry.pop("weight", 1.0))
    reg = regularizers.build(entry.pop("kind", name), **entry)
    if reg.needs_bits and not train_bits:
      continue
    out[name] = (reg, weight)
  return out


def _clip_bits(params, lo: float, hi: float):
  return tu.path_aware_map(
      lambda path, v: jnp.clip(v, lo, hi) if path[-1] == BITS_LEAF else v, params)


def _keep_bits(params, old):
  flat, flat_old = tu.flatten_dict(dict(params)), tu.flatten_dict(dict(old))
  return tu.unflatten_dict({k: flat_old[k] if k[-1] == BITS_LEAF else v
                            for k, v in flat.items()})


GROUP_WEIGHTINGS = ("none", "inverse_frequency", "sqrt_inverse_frequency")


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


def make_train_step(model, tx, penalties: dict, layers, *, num_groups: int,
                    target_bits: float, bit_bounds: tuple[float, float],
                    freeze_bits: bool = False, group_weights=None):
  """The jittable update step: state, batch -> state, metrics.

  With `freeze_bits` the bit-width leaves keep their values whatever the
  optimizer (whose moments may still move them) says: the final phase of a
  BAQ run trains weights at a fixed integer allocation. `group_weights` ([G]
  or None) weights each example's task loss by its group (the "disparately
  skews" paper's weighted-loss mitigation). The model runs with train=True
  and its updated BatchNorm statistics go into the state.
  """

  def loss_fn(params, batch_stats, batch, key, pen_state, step):
    logits, new_vars = apply_model(
        model, {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
        rngs={"quant": key, "dropout": jax.random.fold_in(key, 1)}, mutable=["batch_stats"])
    per_ex = losses.cross_entropy(logits, batch["label"])
    gl = losses.group_stats(per_ex, batch["group"], num_groups)
    if group_weights is None:
      task = jnp.mean(per_ex)
    else:
      w = jnp.asarray(group_weights)[batch["group"]]
      task = jnp.sum(w * per_ex) / jnp.maximum(jnp.sum(w), 1e-12)
    avg_bits = U.average_bits(params, layers)
    ctx = regularizers.PenaltyContext(
        gl.mean, gl.count, gl.present, per_ex, logits, batch["label"], batch["group"],
        avg_bits, jnp.float32(target_bits), step)
    total, new_state, metrics = task, {}, {"task_loss": task, "avg_bits": avg_bits}
    for name, (reg, weight) in penalties.items():
      value, new_state[name], m = reg.apply(ctx, pen_state[name])
      total = total + weight * value
      metrics[f"penalty/{name}"] = value
      metrics.update({f"{name}/{k}": v for k, v in m.items()})
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    metrics["loss"] = total
    metrics["group_correct"] = jax.ops.segment_sum(correct, batch["group"], num_groups)
    metrics["group_count"] = gl.count
    return total, (new_state, new_vars.get("batch_stats", {}), metrics)

  def step_fn(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, (pen_state, batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
        state["params"], state.get("batch_stats", {}), batch, key, state["penalty_state"],
        state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = _clip_bits(optax.apply_updates(state["params"], updates), *bit_bounds)
    if freeze_bits:
      params = _keep_bits(params, state["params"])
    new = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
               penalty_state=pen_state, step=state["step"] + 1, data_position=state["step"] + 1)
    return new, metrics

  return step_fn


# Progress-line order and short names; metrics.jsonl keeps the full names.
_FIRST = ("loss", "task_loss")
_LAST = ("avg_bits", "train_acc", "train_worst_group_acc", "val_acc",
         "val_worst_group_acc", "steps_per_s")
_SHORT = {"train_worst_group_acc": "train_worst", "val_worst_group_acc": "val_worst",
          "task_loss": "task", "steps_per_s": "it/s"}


def _order(key: str) -> tuple[int, int, str]:
  if key in _FIRST:
    return 0, _FIRST.index(key), key
  if key in _LAST:
    return 2, _LAST.index(key), key
  return 1, 0, key


class MetricWriter:
  """Metrics as JSON lines in WORKDIR/metrics.jsonl plus a readable line."""

  def __init__(self, workdir: str, name: str):
    self.path, self.name = os.path.join(workdir, "metrics.jsonl"), name

  def write(self, step: int, metrics: dict) -> None:
    if not sh.is_primary():  # one writer on several hosts
      return
    metrics = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
               for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=step, **metrics)) + "\n")
    shown = " ".join(f"{_SHORT.get(k, k)}={v:.4g}" for k, v in sorted(
        metrics.items(), key=lambda kv: _order(kv[0])) if isinstance(v, float))
    print(f"[{self.name}] step {step:5d} {shown}", flush=True)


def _summarise(history: list[dict]) -> dict:
  stacked = jax.device_get(history)
  out = {k: float(np.mean([h[k] for h in stacked])) for k in stacked[0]
         if np.ndim(stacked[0][k]) == 0}
  correct = np.sum([h["group_correct"] for h in stacked], 0)
  count = np.sum([h["group_count"] for h in stacked], 0)
  acc = np.where(count > 0, correct / np.maximum(count, 1), np.nan)
  out["train_worst_group_acc"] = float(np.nanmin(acc))
  out["train_acc"] = float(correct.sum() / count.sum())
  return out


def _check_finite(history: list[dict], workdir: str, last_saved: Optional[int]) -> None:
  bad = [i for i, h in enumerate(jax.device_get([h["loss"] for h in history]))
         if not np.isfinite(h)]
  if bad:
    raise FloatingPointError(
        f"Non-finite loss in run {workdir} ({len(bad)} of the last {len(history)} "
        f"steps). Stopped; the last good checkpoint (step {last_saved}) is intact. "
        "Lower the learning rate or a penalty weight and resume.")


@functools.partial(jax.jit, static_argnums=0)
def model_variables(model, key: jax.Array, sample: jax.Array) -> dict:
  """`model.init` as one compiled program: {"params", maybe "batch_stats"}.

  Initialised op by op, every initializer compiles on its own (seconds each
  on CPU).
  """
  return model.init({"params": key, "quant": key}, sample)


def init_state(params: Any, batch_stats: Any, tx: optax.GradientTransformation,
               penalties: dict, num_groups: int, rng: jax.Array) -> dict:
  """The train state at step 0 (a plain dict; see the module docstring)."""
  return dict(step=jnp.int32(0), data_position=jnp.int32(0), params=params,
              batch_stats=batch_stats, opt_state=tx.init(params), rng=jax.random.key_data(rng),
              penalty_state={n: r.init(num_groups) for n, (r, _) in penalties.items()})


def train(config: ml_collections.ConfigDict, workdir: str, *, mode: str, data: dict,
          steps: int, lr: float, bits: Optional[float] = None,
          init_params: Optional[dict] = None, use_penalties: bool = True,
          name: Optional[str] = None, init_bits: Optional[np.ndarray] = None,
          init_variables: Optional[dict] = None) -> RunResult:
  """Trains one mode in `workdir`, resuming from its latest checkpoint.

  Args:
    config: the experiment config.
    workdir: this run's directory (checkpoints, metrics.jsonl).
    mode: "float", "qat" or "baq" (see baq.train.modes).
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
  name = name or mode
  sh.initialize_distributed()
  mesh = sh.make_mesh(config)
  spec = get_mode(config, mode, bits)
  train_split = data["train"]
  model = build_model(config.model.name, train_split.num_classes, spec.quantizer,
                      **config.model.kwargs.to_dict())
  sample = jnp.zeros((1,) + train_split.images.shape[1:], jnp.float32)
  init_key, rng = jax.random.split(jax.random.key(config.seed))
  variables = model_variables(model, init_key, sample)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  if init_params is not None and init_variables is not None:
    raise ValueError("Pass init_params or init_variables, not both.")
  if init_params is not None or init_variables is not None:
    start = as_variables(init_params if init_variables is None else init_variables)
    params = merge_params(params, start["params"])
    batch_stats = merge_params(batch_stats, start.get("batch_stats") or {})
  layers = U.find_units(params)
  target = target_bits(config, params, layers) if spec.uses_budget else float("nan")
  if init_bits is not None:
    params = U.scatter_bits(params, layers, np.asarray(init_bits, np.float32))
  elif spec.train_bits and config.quant.init_bits is None:
    params = U.scatter_bits(params, layers, np.full(len(U.unit_numels(layers)), target))

  tx = make_optimizer(config, params, lr=lr, steps=steps, train_bits=spec.train_bits)
  penalties = build_penalties(config, spec.train_bits) if use_penalties else {}
  state = init_state(params, batch_stats, tx, penalties, train_split.num_groups, rng)

  shardings = sh.state_shardings(mesh, state, config)
  ckpt = Checkpointer(workdir, sh.abstract(state, shardings))
  if ckpt.latest_step() is not None:
    state = ckpt.restore()  # onto this run's shardings, whatever layout saved it
    print(f"[{name}] resumed from step {int(state['step'])} in {workdir}", flush=True)
  else:
    state = sh.put(state, shardings)
  bounds = (config.quant.min_bits, config.quant.max_bits)
  weights = group_loss_weights(config.get("group_weighting", "none"), train_split.groups,
                               train_split.num_groups)
  step_kw = dict(num_groups=train_split.num_groups, target_bits=target, bit_bounds=bounds,
                 group_weights=weights)
  search_step = sh.jit_step(make_train_step(model, tx, penalties, layers, **step_kw), mesh,
                            shardings)
  eval_model = model.clone(quant=spec.quantizer.replace(training=False)) \
      if spec.quantizer else model
  final_at = finalize_step(config, spec, steps)
  final_step = sh.jit_step(make_train_step(eval_model, tx, penalties, layers, freeze_bits=True,
                                           **step_kw), mesh, shardings)
  batcher = Batcher(train_split, config.batch_size, seed=config.seed,
                    sampling=config.dataset.sampling, flip=config.dataset.flip)
  writer, history = MetricWriter(workdir, name), []
  last_saved, t0 = ckpt.latest_step(), time.time()
  step = int(state["step"])
  try:
    if steps == 0 and last_saved is None:  # post-training only: keep the result
      ckpt.save(0, state, force=True)
    while step < steps:
      if step == final_at:
        state = sh.put(_finalize(state, layers, target, config, name, workdir), shardings)
      step_fn = final_step if step >= final_at else search_step
      state, metrics = step_fn(state, sh.shard_batch(batcher.batch(step), mesh))
      history.append(metrics)
      step += 1
      log_now = step % config.log_every == 0 or step == steps
      save_now = step % config.checkpoint_every == 0 or step == steps
      if log_now or save_now:
        _check_finite(history, workdir, last_saved)
      if log_now:
        summary = _summarise(history)
        summary["steps_per_s"] = len(history) / max(time.time() - t0, 1e-9)
        if step % config.eval_every == 0 or step == steps:
          val = evaluate_split(eval_model, _variables(state), data["validation"],
                               config.eval_batch_size)
          summary.update(val_acc=val["accuracy"], val_worst_group_acc=val["worst_group_accuracy"])
        writer.write(step, summary)
        history, t0 = [], time.time()
      if save_now:
        ckpt.save(step, state)
        last_saved = step
  finally:
    ckpt.close()
  return RunResult(state["params"], model, spec, workdir, state["batch_stats"])


def _variables(state: dict) -> dict:
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


def finalize_step(config: ml_collections.ConfigDict, spec, steps: int) -> float:
  """The step from which a bit-training run trains at its integer allocation.

  The last `config.quant.finalize_fraction` of the steps train the weights
  with the bit-widths projected onto the budget at integer values and frozen,
  with the quantizer that evaluation and export use; inf when no bits train.
  """
  frac = config.quant.get("finalize_fraction", 0.0) or 0.0
  if not spec.train_bits or frac <= 0:
    return float("inf")
  return steps - max(1, int(round(frac * steps)))


def _finalize(state: dict, layers, target: float, config, name: str, workdir: str) -> dict:
  """Projects the bit-widths onto the budget at integers (host side, once).

  The searched continuous bit-widths are kept in WORKDIR/searched_bits.json
  (the train state holds the integers from here on).
  """
  from baq.quant.export import deploy  # pylint: disable=import-outside-toplevel
  params = sh.to_host(state["params"])
  cont = np.asarray(U.gather_bits(params, layers), np.float64)
  if sh.is_primary():
    with open(os.path.join(workdir, SEARCHED_BITS_FILE), "w") as f:
      json.dump(dict(step=int(state["step"]), units=U.unit_names(layers), bits=cont.tolist()),
                f)
  ints, params = deploy(params, layers, target, config.quant.min_bits, config.quant.max_bits)
  del ints
  avg = float(U.average_bits(params, layers))
  print(f"[{name}] step {int(state['step']):5d} bit-widths projected to integers: "
        f"avg_bits={avg:.4g} (target {target:.4g}); training the weights at them", flush=True)
  return dict(state, params=jax.tree.map(jnp.asarray, params))


def searched_params(workdir: str, params: Any, layers) -> Any:
  """`params` with the continuous bit-widths the run searched, if it saved them."""
  path = os.path.join(workdir, SEARCHED_BITS_FILE)
  if not os.path.exists(path):
    return params
  with open(path) as f:
    saved = json.load(f)
  if saved["units"] != U.unit_names(layers):
    raise ValueError(f"{path} does not match this model's bit-width units.")
  return U.scatter_bits(params, layers, np.asarray(saved["bits"]))


def target_bits(config: ml_collections.ConfigDict, params: Any, layers) -> float:
  """The average-bit budget, from `target_bits` or a `target_bytes` size budget.

  Raises:
    ValueError: the budget lies outside [min_bits, max_bits].
  """
  q = config.quant
  if q.target_bytes is not None:
    t = U.bits_for_bytes(params, layers, q.target_bytes)
    where = f"target_bytes={q.target_bytes} (= {t:.3f} average bits)"
  elif q.target_bits is not None:
    t, where = float(q.target_bits), f"target_bits={q.target_bits}"
  else:
    raise ValueError("mode=baq needs a budget: set quant.target_bits or quant.target_bytes.")
  try:
    U.check_budget(t, q.min_bits, q.max_bits)
  except ValueError as e:
    raise ValueError(f"Impossible budget {where}: {e}") from None
  return t
