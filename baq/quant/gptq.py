"""GPTQ and Fair-GPTQ for one weight matrix: pure functions of arrays.

GPTQ (Frantar et al., 2022) quantizes a kernel W [d_in, d_out] (Flax layout:
Dense (in, out); Conv HWIO flattened to (H*W*I, O)) one input row at a time,
pushing each row's rounding error onto the rows not yet quantized, so that
the output X W is preserved: L(W_q) = ||X (W - W_q)||^2 / n, H = 2 X^T X / n,
for n calibration rows X [n, d_in] (patches, for a conv).

Fair-GPTQ adds a term from paired inputs (one lesion on two skin types gives
rows X_a and X_b; m pairs, D = X_a - X_b), each term a mean over its own rows:

  L_fair = L + alpha ||D (W - W_q)||^2 / m,  H_fair = H + alpha * 2 D^T D / m.

It keeps the quantized layer's response to the *difference* within a pair
close to the float layer's. With alpha = 0 the result is bitwise GPTQ's.

The grid (one of GRIDS: baq's "restricted" one, or GPTQ's "full" one) and
its float16 scales are `baq.quant.gptq_grid`'s.

Speed: two jitted programs (prepare + factor, then the blocks) take group size
and act order as traced values, and kernels are zero-padded (in numpy) to shape
buckets, so that layers of similar size share one compilation.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from baq.quant import fake_quant as fq
from baq.quant import gptq_grid as gg

# Re-exported: the choices callers validate against.
SCALE_DTYPES, GRIDS = gg.SCALE_DTYPES, gg.GRIDS


class GPTQResult(NamedTuple):
  """A quantized kernel.

  Attributes:
    weight: [d_in, d_out] dequantized kernel, exactly codes * scale.
    codes: [d_in, d_out] int32 codes in [-qmax, qmax] (the full grid: [-qmax - 1, qmax]).
    scales: [d_out] per-channel scales, or [ceil(d_in / g), d_out] per group.
    loss: GPTQ's own estimate of the objective increase, sum (w - q)^2 / 2 [H^-1]_ii^2.
    damp: the damping finally added to the Hessian diagonal.
  """
  weight: jax.Array
  codes: jax.Array
  scales: jax.Array
  loss: float
  damp: float


# Kernels are zero-padded to shape buckets (in numpy, which compiles nothing)
# so that layers of similar size share one compiled program: zero rows and
# columns are dead inputs and empty channels, and are sliced off again.
_ROWS, _COLS = 128, 32


def _bucket(n: int, mult: int) -> int:
  return -(-n // mult) * mult


def _pad(a, rows: int, cols: int, value: float = 0.0) -> np.ndarray:
  a = np.asarray(a, np.float32)
  a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a[None]
  return np.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])), constant_values=value)


def _bits(bits, m: int, mp: int) -> np.ndarray:
  b = np.broadcast_to(np.asarray(bits, np.float32), (m,))
  if np.any(b != np.round(b)) or b.min() < 2:
    raise ValueError(f"GPTQ needs integer bits >= 2, got {np.unique(b).tolist()}.")
  return _pad(b, 1, mp, 8.0)[0]


@jax.jit
def _rtn(w, bits, group, half, full):
  scale_rows, pin = gg.static_grid(w, bits, group, half, full)
  codes = gg.codes(w, scale_rows, pin, bits, full)
  return fq.dequantize(codes, scale_rows, 0.0), codes.astype(jnp.int32), scale_rows


def round_to_nearest(w: jax.Array, bits, group_size: Optional[int] = None,
                     scale_dtype: str = "float32", grid: str = "restricted") -> GPTQResult:
  """Round-to-nearest on GPTQ's grid, with its codes and scales.

  Args:
    w: [d_in, d_out] kernel.
    bits: integer bit-width, scalar or one per output channel.
    group_size: as in `gptq`.
    scale_dtype: as in `gptq`.
    grid: as in `gptq`.

  Returns:
    A GPTQResult (loss and damp NaN: no Hessian takes part).
  """
  half, full = gg.is_half(scale_dtype), gg.is_full(grid)
  d, m = np.shape(w)
  g = group_size if group_size and group_size < d else 0
  dp, mp = _bucket(d, _ROWS), _bucket(m, _COLS)
  out, codes, scale_rows = (np.asarray(a)[:d, :m] for a in _rtn(
      _pad(w, dp, mp), _bits(bits, m, mp), group_size or d, half, full))
  return GPTQResult(jnp.asarray(out), jnp.asarray(codes),
                    jnp.asarray(scale_rows[::g] if g else scale_rows[0]), float("nan"),
                    float("nan"))


def rtn(w: jax.Array, bits, group_size: Optional[int] = None,
        scale_dtype: str = "float32", grid: str = "restricted") -> jax.Array:
  """Round-to-nearest on the same grid (on the restricted grid without groups,
  fake_quant's).

  Args:
    w: [d_in, d_out] kernel.
    bits: integer bit-width, scalar or one per output channel.
    group_size: as in `gptq`.
    scale_dtype: as in `gptq`.
    grid: as in `gptq`.

  Returns:
    The dequantized [d_in, d_out] kernel.
  """
  return round_to_nearest(w, bits, group_size, scale_dtype, grid).weight


@jax.jit
def _output_error(xtx, w, w_q):
  dw = w - w_q
  return jnp.sum(dw * (xtx @ dw))


def output_error(xtx: jax.Array, w: jax.Array, w_q: jax.Array) -> float:
  """||X (W - W_q)||^2 from the sums xtx = X^T X, without X itself."""
  d, m = np.shape(w)
  dp, mp = _bucket(d, _ROWS), _bucket(m, _COLS)
  return float(_output_error(_pad(xtx, dp, dp), _pad(w, dp, mp), _pad(w_q, dp, mp)))


def _inverse_cholesky(h, damp):
  """Upper U with U^T U = (H + damp I)^-1 (NaN where Cholesky fails)."""
  eye = jnp.eye(h.shape[0], dtype=h.dtype)
  lower = jnp.linalg.cholesky(h + damp * eye)
  return jnp.linalg.cholesky(jax.scipy.linalg.cho_solve((lower, True), eye)).T


@jax.jit
def _prepare(w, h, bits, d_real, percdamp, group, act_order, half, full):
  """Dead inputs, static grid, act-order permutation, and the factor of H^-1."""
  damp = percdamp * jnp.trace(h) / d_real
  dead = jnp.diag(h) == 0
  # A dead input (always zero on the calibration set) cannot change the output.
  h = h + jnp.diag(dead.astype(h.dtype))
  w = jnp.where(dead[:, None], 0.0, w)
  scale_rows, pin = gg.static_grid(w, bits, group, half, full)
  perm = jnp.where(act_order, jnp.argsort(-jnp.diag(h), stable=True),
                   jnp.arange(w.shape[0]))
  u = _inverse_cholesky(h[perm][:, perm], damp)
  return w[perm], scale_rows[perm], pin[perm], perm, u, damp


@functools.partial(jax.jit, static_argnames=("block",))
def _blocks(w, hinv, scale_rows, pin_rows, bits, perm, regroup_every, half, full, *, block):
  """Column-by-column rounding with error feedback and lazy block updates.

  With regroup_every = g > 0 the grid of each group of g rows is taken from
  the error-updated weights when the group starts; every group lies inside
  one block (block % g == 0). hinv is upper triangular, so subtracting a
  whole block row of it leaves the rows before the block untouched.
  """
  d, m = w.shape
  g = regroup_every
  idx = jnp.arange(block)

  def column(i, carry):
    w1, c1, e1, s1, p1, hinv1, loss = carry

    def regroup(sp):
      rows = (idx >= i) & (idx < i + g)
      s, p = gg.grid(w1, bits, rows, half, full)
      return jnp.where(rows[:, None], s, sp[0]), jnp.where(rows[:, None], p, sp[1])

    s1, p1 = jax.lax.cond((g > 0) & (i % jnp.maximum(g, 1) == 0), regroup,
                          lambda sp: sp, (s1, p1))
    row, diag = w1[i], hinv1[i, i]
    codes = gg.codes(row, s1[i], p1[i], bits, full)
    err = (row - fq.dequantize(codes, s1[i], 0.0)) / diag
    w1 = w1 - jnp.outer(hinv1[i], err)
    return (w1, c1.at[i].set(codes), e1.at[i].set(err), s1, p1, hinv1,
            loss + 0.5 * jnp.sum(err * err))

  def block_step(b, carry):
    w, codes, scales, loss = carry
    i1 = b * block
    take = lambda a, axis=0: jax.lax.dynamic_slice_in_dim(a, i1, block, axis)
    rows = take(hinv)
    init = (take(w), jnp.zeros((block, m)), jnp.zeros((block, m)), take(scales),
            take(pin_rows), take(rows, 1), loss)
    _, c1, e1, s1, _, _, loss = jax.lax.fori_loop(0, block, column, init)
    w = w - rows.T @ e1
    put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v, i1, 0)
    return w, put(codes, c1), put(scales, s1), loss

  init = (w, jnp.zeros_like(w), scale_rows, jnp.float32(0.0))
  _, codes, scale_rows, loss = jax.lax.fori_loop(0, d // block, block_step, init)
  inv = jnp.argsort(perm)
  codes, scale_rows = codes[inv], scale_rows[inv]
  return fq.dequantize(codes, scale_rows, 0.0), codes.astype(jnp.int32), scale_rows, loss


def gptq(w: jax.Array, h: jax.Array, bits, *, block_size: int = 128,
         group_size: Optional[int] = None, act_order: bool = False,
         percdamp: float = 0.01, max_tries: int = 8,
         name: str = "layer", scale_dtype: str = "float32",
         grid: str = "restricted") -> GPTQResult:
  """Quantizes one kernel with GPTQ against the Hessian h.

  Args:
    w: [d_in, d_out] float kernel (a conv kernel flattened HWIO -> (H*W*I, O)).
    h: [d_in, d_in] Hessian, `hessian(...)` or `fair_hessian(...)`.
    bits: integer bit-width, scalar or one per output channel.
    block_size: rows per lazy block update (rounded to a multiple of group_size).
    group_size: if set, one scale per group of this many consecutive input
      rows (in the original order) and output channel.
    act_order: quantize rows in order of decreasing diag(h). With groups the
      group scales are then fixed from the original weights (GPTQ's
      `static_groups`), so groups stay contiguous in the original layout.
    percdamp: damping as a fraction of mean(diag h), added before inversion;
      multiplied by 10 (with a warning) while Cholesky fails.
    max_tries: Cholesky attempts before raising FloatingPointError.
    name: layer name used in warnings and errors.
    scale_dtype: "float32", or "float16" to round every scale to float16
      before its codes are chosen (`SCALE_DTYPES`).
    grid: "restricted" (baq's, fake_quant's) or "full" (GPTQ's 2^b levels; `GRIDS`).

  Returns:
    A GPTQResult.
  """
  half, full = gg.is_half(scale_dtype), gg.is_full(grid)
  d, m = np.shape(w)
  g = group_size if group_size and group_size < d else 0
  block = g * max(1, block_size // g) if g else block_size
  dp, mp = _bucket(d, block), _bucket(m, _COLS)
  bits = _bits(bits, m, mp)
  w_p, h_p = _pad(w, dp, mp), _pad(h, dp, dp)
  for attempt in range(max_tries):
    w_perm, scale_rows, pin, perm, u, damp = _prepare(w_p, h_p, bits, d, percdamp, g,
                                                      act_order, half, full)
    damp = float(damp)
    if np.isfinite(np.asarray(u)).all():
      break
    if attempt + 1 == max_tries:
      raise FloatingPointError(
          f"GPTQ {name}: the Hessian is not positive definite even with damping "
          f"{damp:.3g} after {max_tries} tries (non-finite calibration inputs?).")
    new = 10.0 * percdamp if percdamp > 0 else 1e-6
    warnings.warn(f"GPTQ {name}: Cholesky of the damped Hessian failed with damping "
                  f"{damp:.3g} (percdamp {percdamp:.3g}); retrying with percdamp {new:.3g}.")
    percdamp = new
  weight, codes, scale_rows, loss = _blocks(w_perm, u, scale_rows, pin, bits, perm,
                                            0 if act_order else g, half, full, block=block)
  scale_rows = np.asarray(scale_rows)[:d, :m]
  return GPTQResult(jnp.asarray(np.asarray(weight)[:d, :m]),
                    jnp.asarray(np.asarray(codes)[:d, :m]),
                    jnp.asarray(scale_rows[::g] if g else scale_rows[0]),
                    float(loss), damp)

