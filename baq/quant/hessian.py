"""Layer Hessians of GPTQ and Fair-GPTQ: running sums of x x^T over calibration rows.

H = 2 X^T X / n for a layer's n input rows X [n, d_in]; Fair-GPTQ's pair
term is the same statistic of the pair differences D = X_a - X_b, added with
weight alpha (`fair_hessian`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HessianStats(NamedTuple):
  """Running sums for a layer Hessian.

  Attributes:
    xtx: [d, d] float32 sum of x x^T over the rows seen.
    count: number of rows seen (a Python int).
  """
  xtx: jax.Array
  count: int


def init_stats(dim: int) -> HessianStats:
  """Empty Hessian statistics for `dim` inputs."""
  return HessianStats(jnp.zeros((dim, dim), jnp.float32), 0)


def update_stats(stats: HessianStats, x: jax.Array) -> HessianStats:
  """Adds rows x [n, d] (layer inputs, or pair differences) to the sums."""
  x = jnp.asarray(x, jnp.float32).reshape(-1, stats.xtx.shape[0])
  return HessianStats(stats.xtx + x.T @ x, stats.count + x.shape[0])


def hessian(stats: HessianStats) -> jax.Array:
  """H = 2 X^T X / n (zeros if nothing was seen)."""
  return 2.0 * stats.xtx / max(stats.count, 1)


def fair_hessian(h: jax.Array, h_pair: jax.Array, alpha: float) -> jax.Array:
  """H_fair = H + alpha * H_pair, with H_pair = `hessian` of the differences.

  Returns `h` itself for alpha = 0, so Fair-GPTQ is then GPTQ bit for bit.
  """
  if alpha < 0:
    raise ValueError(f"alpha must be >= 0, got {alpha}.")
  return h if alpha == 0 else h + alpha * h_pair
