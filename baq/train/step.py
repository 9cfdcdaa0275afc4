"""The update step: state, batch -> state, metrics (jitted by the trainer).

The loss is the task loss (optionally weighted by group) plus every
penalty's weighted value; the metrics carry each term and the per-group
correct counts of the batch. The model runs with train=True and its updated
BatchNorm statistics go into the state.
"""

from __future__ import annotations

from typing import Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import optax

from baq.variables import apply_model
from baq.fairness import losses, regularizers
from baq.quant import units
from baq.quant.inject import BITS_LEAF


def _clip_bits(params, lo: float, hi: float):
  return tu.path_aware_map(
      lambda path, v: jnp.clip(v, lo, hi) if path[-1] == BITS_LEAF else v, params)


def _keep_bits(params, old):
  flat, flat_old = tu.flatten_dict(dict(params)), tu.flatten_dict(dict(old))
  return tu.unflatten_dict({k: flat_old[k] if k[-1] == BITS_LEAF else v
                            for k, v in flat.items()})


def make_loss_fn(model, penalties: dict, layers, *, num_groups: int, budget: float,
                 group_weights: Optional[jax.Array] = None):
  """loss_fn(params, batch_stats, batch, key, penalty_state, step) -> (loss, aux).

  The task loss (weighted by group when `group_weights` is given) plus each
  penalty's weighted value; aux is (new penalty state, new batch_stats,
  metrics). Arguments as in `make_train_step`.
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
    avg_bits = units.average_bits(params, layers)
    ctx = regularizers.PenaltyContext(
        gl.mean, gl.count, gl.present, per_ex, logits, batch["label"], batch["group"],
        avg_bits, jnp.float32(budget), step)
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

  return loss_fn


def make_train_step(model, tx: optax.GradientTransformation, penalties: dict, layers, *,
                    num_groups: int, budget: float,
                    bit_bounds: Optional[tuple[float, float]],
                    freeze_bits: bool = False, group_weights: Optional[jax.Array] = None):
  """The jittable update step: state, batch -> state, metrics.

  Args:
    model: the model the step trains.
    tx: the optimizer.
    penalties: name -> (Regularizer, weight).
    layers: the bit-width units (for the differentiable average bit-width).
    num_groups: groups of the data.
    budget: the average-bit budget the penalties see (nan without one).
    bit_bounds: (lo, hi) every bit-width leaf is clipped to after the update,
      or None to leave them as they are (bits that do not train).
    freeze_bits: the bit-width leaves keep their values whatever the
      optimizer (whose moments may still move them) says: the final phase of
      a BAQ run trains the weights at a fixed integer allocation.
    group_weights: [G] weights of each example's task loss by its group (the
      "disparately skews" paper's weighted-loss mitigation), or None.

  Returns:
    step_fn(state, batch) -> (state, metrics).
  """

  loss_fn = make_loss_fn(model, penalties, layers, num_groups=num_groups, budget=budget,
                         group_weights=group_weights)

  def step_fn(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, (pen_state, batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
        state["params"], state.get("batch_stats", {}), batch, key, state["penalty_state"],
        state["step"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if bit_bounds is not None:
      params = _clip_bits(params, *bit_bounds)
    if freeze_bits:
      params = _keep_bits(params, state["params"])
    new = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
               penalty_state=pen_state, step=state["step"] + 1, data_position=state["step"] + 1)
    return new, metrics

  return step_fn


def make_bilevel_step(model, tx: optax.GradientTransformation, penalties: dict, layers, *,
                      num_groups: int, budget: float, bit_bounds: tuple[float, float]):
  """A first-order bi-level update: the weights on a training batch, the bits on a held-out one.

  Both gradients are taken at the same parameters (DARTS' first-order
  approximation of the bi-level problem): the weight leaves step along the
  training batch's loss, the bit-width leaves along the held-out batch's
  (with the same penalties, so the worst-group CVaR term and the bitrate
  constraint shape the bits on examples the weights never fit). BatchNorm
  statistics follow the training batch; the penalties' state (the bitrate
  multiplier) the held-out pass.

  Returns:
    step_fn(state, train_batch, heldout_batch) -> (state, metrics of the
    training batch, with "heldout_loss").
  """
  loss_fn = make_loss_fn(model, penalties, layers, num_groups=num_groups, budget=budget)

  def step_fn(state, train_batch, heldout_batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    args = (state["params"], state.get("batch_stats", {}))
    gw, (_, batch_stats, metrics) = jax.grad(loss_fn, has_aux=True)(
        *args, train_batch, key, state["penalty_state"], state["step"])
    gb, (pen_state, _, held) = jax.grad(loss_fn, has_aux=True)(
        *args, heldout_batch, jax.random.fold_in(key, 2), state["penalty_state"], state["step"])
    fw, fb = tu.flatten_dict(dict(gw)), tu.flatten_dict(dict(gb))
    grads = tu.unflatten_dict({k: fb[k] if k[-1] == BITS_LEAF else v for k, v in fw.items()})
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = _clip_bits(optax.apply_updates(state["params"], updates), *bit_bounds)
    new = dict(state, params=params, batch_stats=batch_stats, opt_state=opt_state,
               penalty_state=pen_state, step=state["step"] + 1, data_position=state["step"] + 1)
    return new, dict(metrics, heldout_loss=held["loss"])

  return step_fn
