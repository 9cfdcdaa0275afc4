"""Regularizers: the research API for penalties added to the task loss.

A regularizer is one registered factory that takes its hyper-parameters and
returns a `Regularizer`, a pair of pure functions in the style of optax:

  init(num_groups)     -> state (any pytree; () when stateless)
  apply(ctx, state)    -> (value, new_state, metrics)

`ctx` (a `PenaltyContext`) holds what a penalty may need: per-group losses
computed once per batch, per-example losses, logits, labels, group ids, the
differentiable average bit-width and the bit budget. The trainer adds
`weight * value` to the loss for every entry of `config.penalties`, logs
`value` as `penalty/NAME` and each metric as `NAME/KEY`, and carries the state
through checkpoints. Adding a regularizer touches no trainer code:

  @register("loss_range")
  def loss_range():
    def fn(ctx):
      return masked_max(ctx.group_loss, ctx.present) - masked_min(
          ctx.group_loss, ctx.present), {}
    return stateless(fn)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from baq.fairness.losses import cvar_of, masked_max, masked_mean, masked_min
from baq.registry import Registry

Metrics = dict[str, jax.Array]


class PenaltyContext(NamedTuple):
  """Inputs available to every regularizer (all arrays; jit-friendly).

  Attributes:
    group_loss: [G] mean task loss per group (0 where absent).
    group_count: [G] examples per group in the batch.
    present: [G] bool mask of groups present in the batch.
    per_example_loss: [N] task loss per example.
    logits: [N, C].
    labels: [N].
    groups: [N].
    avg_bits: scalar, weight-count-weighted mean bit-width (differentiable).
    target_bits: scalar bit budget (NaN when the run has none).
    step: scalar int training step.
  """

  group_loss: jax.Array
  group_count: jax.Array
  present: jax.Array
  per_example_loss: jax.Array
  logits: jax.Array
  labels: jax.Array
  groups: jax.Array
  avg_bits: jax.Array
  target_bits: jax.Array
  step: jax.Array


class Regularizer(NamedTuple):
  """A penalty as a pair of pure functions (see module docstring)."""

  init: Callable[[int], Any]
  apply: Callable[[PenaltyContext, Any], tuple[jax.Array, Any, Metrics]]
  needs_bits: bool = False


REGULARIZERS: Registry[Callable[..., Regularizer]] = Registry("regularizer")
register = REGULARIZERS.register


def stateless(fn: Callable[[PenaltyContext], tuple[jax.Array, Metrics]]) -> Regularizer:
  """Wraps `fn(ctx) -> (value, metrics)` as a Regularizer with no state."""

  def apply(ctx, state):
    value, metrics = fn(ctx)
    return value, state, metrics

  return Regularizer(init=lambda num_groups: (), apply=apply)


def build(name: str, **hparams: Any) -> Regularizer:
  """Builds the registered regularizer `name` with its hyper-parameters.

  Raises:
    KeyError: unknown name (the message lists the valid ones).
    TypeError: a hyper-parameter the regularizer does not take.
  """
  factory = REGULARIZERS.get(name)
  try:
    return factory(**hparams)
  except TypeError as e:
    raise TypeError(f"Regularizer {name!r}: {e}") from None


# --- worst-group fairness -------------------------------------------------


@register("smooth_max")
def smooth_max(temperature: float = 0.1) -> Regularizer:
  """Log-sum-exp smoothed max of the present groups' losses.

  `t * (logsumexp(L_g / t) - log n)`, which lies between their mean and max
  and tends to the max as t -> 0.
  """

  def fn(ctx):
    z = jnp.where(ctx.present, ctx.group_loss / temperature, -jnp.inf)
    n = jnp.maximum(jnp.sum(ctx.present), 1)
    return temperature * (jax.nn.logsumexp(z) - jnp.log(n)), {}

  return stateless(fn)


@register("cvar")
def cvar(alpha: float = 0.34) -> Regularizer:
  """Conditional value-at-risk over groups: mean loss of the worst alpha of groups."""
  if not 0.0 < alpha <= 1.0:
    raise ValueError(f"cvar alpha must lie in (0, 1], got {alpha}.")
  return stateless(lambda ctx: (cvar_of(ctx.group_loss, ctx.present, alpha), {}))


@register("group_dro")
def group_dro(step_size: float = 0.01) -> Regularizer:
  """Online group DRO (Sagawa et al.): exponentiated-gradient group weights.

  The state q is a distribution over groups, updated q_g <- q_g exp(eta L_g)
  for the groups present in the batch and renormalised *among them*, so that
  together they keep the mass they had: a group absent from the batch keeps
  its weight exactly (rare groups, often the worst ones, are absent from many
  batches). With every group present this is Sagawa et al.'s update. The
  penalty is sum_g q_g L_g over the groups present (q renormalised over
  them), with q held constant for the gradient.
  """

  def init(num_groups):
    return jnp.full((num_groups,), 1.0 / num_groups, jnp.float32)

  def apply(ctx, q):
    loss = jax.lax.stop_gradient(ctx.group_loss)
    grown = jnp.where(ctx.present, q * jnp.exp(step_size * loss), 0.0)
    mass = jnp.sum(jnp.where(ctx.present, q, 0.0))
    # Absent groups keep their weight for later batches but take no part now.
    q_new = jnp.where(ctx.present, grown * mass / jnp.maximum(jnp.sum(grown), 1e-30), q)
    qp = jnp.where(ctx.present, q_new, 0.0)
    value = jnp.sum(qp * jnp.where(ctx.present, ctx.group_loss, 0.0)) / jnp.maximum(
        jnp.sum(qp), 1e-12)
    return value, q_new, {"max_weight": jnp.max(q_new)}

  return Regularizer(init, apply)


@register("gap")
def gap() -> Regularizer:
  """FairQuant's penalty: worst minus best group loss."""
  return stateless(lambda ctx: (
      masked_max(ctx.group_loss, ctx.present)
      - masked_min(ctx.group_loss, ctx.present), {}))


@register("variance")
def variance() -> Regularizer:
  """Variance of the present groups' losses (unweighted across groups)."""

  def fn(ctx):
    mu = masked_mean(ctx.group_loss, ctx.present)
    return masked_mean((ctx.group_loss - mu) ** 2, ctx.present), {}

  return stateless(fn)


# --- bitrate ---------------------------------------------------------------


@register("bitrate")
def bitrate(dual_lr: float = 0.05, rho: float = 1.0, init_multiplier: float = 0.0,
            max_multiplier: Optional[float] = None, equality: bool = False
            ) -> Regularizer:
  """Average-bit budget as an augmented-Lagrangian constraint with dual ascent.

  Inequality form (B <= T, the default): value = lam * (B - T) +
  rho/2 * max(0, B - T)^2 for mean bit-width B and target T; the multiplier
  lam >= 0 (the state) rises by dual_lr * (B - T) every step the budget is
  exceeded and falls when it is met, so the constraint is enforced rather
  than traded off. Equality form (B = T, `equality=True`): lam is free in
  sign and the quadratic acts on both sides, so bits that the task does not
  claim are pushed back up to spend the whole budget; the run then learns
  *where* the bits go, not how few it can get away with. Either way the
  exported allocation is projected onto the budget after rounding
  (`baq.allocation.projection.nearest`).
  """

  def init(num_groups):
    del num_groups
    return jnp.float32(init_multiplier)

  def apply(ctx, lam):
    excess = ctx.avg_bits - ctx.target_bits
    over = excess if equality else jnp.maximum(excess, 0.0)
    value = lam * excess + 0.5 * rho * over ** 2
    new = lam + dual_lr * jax.lax.stop_gradient(excess)
    if not equality:
      new = jnp.maximum(new, 0.0)
    if max_multiplier is not None:
      new = jnp.clip(new, -max_multiplier, max_multiplier)
    return value, new, {"multiplier": new, "excess_bits": excess}

  return Regularizer(init, apply, needs_bits=True)
