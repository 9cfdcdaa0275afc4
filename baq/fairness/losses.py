"""Per-example and per-group losses: one function serves training, penalties
and evaluation.

Group statistics are segment sums over integer group ids, computed once per
batch. A group absent from a batch has count 0 and mean 0, and is reported
through the `present` mask so that penalties ignore it instead of producing
NaNs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class GroupStats(NamedTuple):
  """Per-group means of a per-example quantity.

  Attributes:
    mean: [G] weighted mean per group (0 where the group is absent).
    count: [G] total weight per group in the batch.
    present: [G] bool, count > 0.
  """

  mean: jax.Array
  count: jax.Array
  present: jax.Array


def group_stats(values: jax.Array, groups: jax.Array, num_groups: int,
                weights: Optional[jax.Array] = None) -> GroupStats:
  """Weighted per-group means of `values` (one segment sum, no Python loop).

  Args:
    values: [N] per-example values.
    groups: [N] int group ids in [0, num_groups).
    num_groups: number of groups G.
    weights: optional [N] example weights (e.g. a padding mask).

  Returns:
    GroupStats with [G] arrays.
  """
  w = jnp.ones_like(values) if weights is None else weights.astype(values.dtype)
  sums = jax.ops.segment_sum(values * w, groups, num_segments=num_groups)
  count = jax.ops.segment_sum(w, groups, num_segments=num_groups)
  present = count > 0
  mean = jnp.where(present, sums / jnp.where(present, count, 1.0), 0.0)
  return GroupStats(mean, count, present)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[N] softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Max of x over mask (x must have at least one unmasked entry)."""
  return jnp.max(jnp.where(mask, x, -jnp.inf))


def masked_min(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Min of x over mask (x must have at least one unmasked entry)."""
  return jnp.min(jnp.where(mask, x, jnp.inf))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x over mask; 0 if nothing is unmasked."""
  n = jnp.sum(mask)
  return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n, 1)


def cvar_of(losses: jax.Array, present: jax.Array, alpha: float) -> jax.Array:
  """CVaR_alpha of a uniform distribution over the present groups' losses.

  The mean of the worst alpha-fraction of groups, with the boundary group
  counted fractionally; alpha=1 gives the mean, alpha -> 0 the max.
  """
  n = jnp.sum(present).astype(jnp.float32)
  k = jnp.maximum(alpha * n, 1e-6)
  ordered = jnp.sort(jnp.where(present, losses, -jnp.inf))[::-1]
  w = jnp.clip(k - jnp.arange(losses.shape[0], dtype=jnp.float32), 0.0, 1.0)
  return jnp.sum(w * jnp.where(jnp.isfinite(ordered), ordered, 0.0)) / k
