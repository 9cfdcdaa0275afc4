"""Float32 orders of two ATen CPU kernels that bitsandbytes leans on: linspace and sum.

Both are exact transcriptions of the order of operations, so the results
are torch's bit for bit where the order is fixed by the shapes alone:
  * `linspace`: RangeFactoriesKernel.cpp, as its AVX2 and AVX-512 builds
    round (one rounding per element: a fused multiply-add).
  * `cascade_sum`: SumKernel.cpp's float32 sum of a contiguous vector
    (what `t.sum()` and `t.mean()` compute): four interleaved accumulators
    of 8-lane vectors (the sum kernel is dispatched at AVX2 width on AVX-512
    CPUs too, and the scalar build's Vectorized<float> has 8 lanes as well),
    each summed in levels of 16 (`multi_row_sum`), then the scalar tail and
    the lanes. Above ATen's GRAIN_SIZE (32,768 elements) with more than one
    torch thread the sum is split per thread, which is not modelled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_LANES, _ILP, _LEVELS, _MIN_POWER = 8, 4, 4, 4


def linspace(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps, dtype=float32) on a vectorising CPU.

  start + step * i for the first half, end - step * (steps - 1 - i) for the
  rest, each rounded once (a scalar build rounds the product first). A
  float32 product is exact in float64, and for a range within one binade
  or two, so is the sum.
  """
  s, e = np.float32(start), np.float32(end)
  step = np.float64((e - s) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  return np.where(i < steps // 2, np.float64(s) + step * i,
                  np.float64(e) - step * (steps - 1 - i)).astype(np.float32)


def _seq(a: jax.Array) -> jax.Array:
  """Left-to-right float32 sum over axis 0, from 0 (a running accumulator)."""
  acc = jnp.zeros(a.shape[1:], a.dtype)
  for row in a:
    acc = acc + row
  return acc


def _grouped(a: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """(running sums of each full group of `size` rows, the rows left over)."""
  full = a.shape[0] // size * size
  head = a[:full].reshape(-1, size, *a.shape[1:])
  return _seq(jnp.moveaxis(head, 1, 0)), a[full:]


def _multi_row_sum(x: jax.Array) -> jax.Array:
  """multi_row_sum over axis 0 of x [size, ...]: a chunked running sum in 4 levels."""
  size = x.shape[0]
  power = max(_MIN_POWER, (int(size - 1).bit_length() if size > 1 else 0) // _LEVELS)
  step = 1 << power
  chunks, tail = _grouped(x, step)      # acc[0] per full chunk, then acc[0]'s tail
  level1, rest1 = _grouped(chunks, step)  # acc[1] moves up every `step` chunks
  level2, rest2 = _grouped(level1, step)  # acc[2] every step**2
  acc = [_seq(tail), _seq(rest1), _seq(rest2), _seq(level2)]
  return ((acc[0] + acc[1]) + acc[2]) + acc[3]


def _row_sum(x: jax.Array) -> jax.Array:
  """row_sum over axis 0: four interleaved accumulators, the tail into the first."""
  size = x.shape[0]
  n_ilp = size // _ILP
  if n_ilp:
    parts = _multi_row_sum(x[:n_ilp * _ILP].reshape(n_ilp, _ILP, *x.shape[1:]))
  else:
    parts = jnp.zeros((_ILP, *x.shape[1:]), x.dtype)
  first = parts[0]
  for row in x[n_ilp * _ILP:]:
    first = first + row
  for k in range(1, _ILP):
    first = first + parts[k]
  return first


def cascade_sum(x: jax.Array) -> jax.Array:
  """torch's float32 x.sum() of a 1-D contiguous tensor, as SumKernel.cpp orders it.

  Args:
    x: float32 [n].

  Returns:
    The float32 scalar sum, bit for bit torch's (single-threaded, or n below
    32,768).
  """
  n = x.shape[0]
  if n < _LANES:  # scalar_inner_sum
    return _row_sum(x)
  vecs = n // _LANES
  lanes = _row_sum(x[:vecs * _LANES].reshape(vecs, _LANES))  # vectorized_inner_sum
  total = jnp.zeros((), x.dtype)
  for v in x[vecs * _LANES:]:
    total = total + v
  for k in range(_LANES):
    total = total + lanes[k]
  return total
