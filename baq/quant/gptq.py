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

The grid is symmetric per output channel (or group) from the absmax, one of
GRIDS. "restricted" is baq's: scales and codes come from
`baq.quant.fake_quant`, codes in [-(2^(b-1) - 1), 2^(b-1) - 1]; the element
of largest magnitude of each output channel (or group) is pinned to the code
+-qmax, so the channel's absmax, and so the scale that `fake_quant` derives
from the quantized weight, is unchanged: fake_quant(W_q) == W_q holds
exactly, and a vision model that fake-quantizes its kernels at inference
runs a GPTQ'd kernel unmoved. The pin is one more rounding choice whose
error GPTQ feeds back like any other. "full" is GPTQ's own (the reference
code, GPTQModel): scale 2 absmax / (2^b - 1), codes in [-2^(b-1), 2^(b-1) - 1],
all 2^b levels (the GPTQ format's zero point 2^(b-1), llama.cpp's q4_0); the
language-model path uses it (`baq.ptq.decoder_group.Options.grid`). With
scale_dtype="float16" each scale is rounded to float16 before any code is
chosen, so that formats storing fp16 scales (GGUF's blocks, GPTQ
checkpoints) hold the grid exactly.

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

SCALE_DTYPES = ("float32", "float16")
# "restricted": baq's symmetric grid (fake_quant's), scale = absmax / (2^(b-1) - 1),
# codes in [-(2^(b-1) - 1), 2^(b-1) - 1], the channel's absmax pinned to +-qmax.
# "full": GPTQ's symmetric grid (the reference code, GPTQModel; the GPTQ format's
# zero point 2^(b-1), llama.cpp's q4_0), scale = 2 absmax / (2^b - 1), codes in
# [-2^(b-1), 2^(b-1) - 1]: all 2^b levels, a step 2^(b-1)/(2^b - 1) x 2 finer.
GRIDS = ("restricted", "full")
# fp16's smallest subnormal and largest finite value: an empty channel's
# scale stays nonzero (its codes are 0 either way) and none overflows.
_F16_TINY, _F16_MAX = 2.0**-24, 65504.0


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


def _half(scale_dtype: str) -> bool:
  """True for float16 scales; raises on an unknown scale_dtype (before any work)."""
  if scale_dtype not in SCALE_DTYPES:
    raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, "
                     f"got {scale_dtype!r}.")
  return scale_dtype == "float16"


def _full(grid: str) -> bool:
  """True for the full grid; raises on an unknown grid (before any work)."""
  if grid not in GRIDS:
    raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}.")
  return grid == "full"


def _scale(hi: jax.Array, bits: jax.Array, half=False, full=False) -> jax.Array:
  """The symmetric scale for the absmax hi (broadcast against bits): fake_quant's,
  or the full grid's 2 hi / (2^b - 1) where `full`; rounded to float16 where
  `half` (traced flags: one compilation for every combination)."""
  # XLA rewrites x / broadcast(q) as x * (1 / q), an ulp off; bits shaped like
  # hi (through data, so it cannot fold) keeps the true IEEE division, which is
  # what fake_quant computes for per-channel bits.
  b = bits + 0.0 * hi
  s = fq.scale_and_zero_point(-hi, hi, b, True)[0]
  s = jnp.where(full & (hi > 0), (2.0 * hi) / (2.0 ** b - 1.0), s)
  s16 = jnp.clip(s.astype(jnp.float16).astype(jnp.float32), _F16_TINY, _F16_MAX)
  return jnp.where(half, s16, s)


def grid(w: jax.Array, bits: jax.Array, rows: Optional[jax.Array] = None, half=False,
         full=False):
  """The absmax scale of each column of w and the elements pinned to +-qmax.

  Args:
    w: [r, d_out] weights that share one scale per output channel.
    bits: [d_out] or scalar integer bit-widths.
    rows: optional [r] bool; only these rows set the scale and get pins.
    half: round the scales to float16 (a bool, traced or not).
    full: the full grid (`GRIDS`), which pins nothing (a bool, traced or not).

  Returns:
    scale [1, d_out], and pin [r, d_out]: on the restricted grid the sign of
    w where it holds its channel's absmax (the code there is forced to
    +-qmax), 0 elsewhere.
  """
  a = jnp.abs(w) if rows is None else jnp.where(rows[:, None], jnp.abs(w), 0.0)
  hi = jnp.max(a, axis=0, keepdims=True)
  pin = jnp.where(full, 0.0, jnp.sign(w) * (a == hi))
  return (_scale(hi, bits, half, full),
          pin if rows is None else jnp.where(rows[:, None], pin, 0.0))


def _static_grid(w, bits, group, half, full=False):
  """Per-row scales [d, m] and pins, one grid per `group` rows (0: all rows)."""
  d = w.shape[0]
  seg = jnp.arange(d) // jnp.where(group > 0, group, d)
  hi = jax.ops.segment_max(jnp.abs(w), seg, num_segments=d)[seg]
  return (_scale(hi, bits, half, full),
          jnp.where(full, 0.0, jnp.sign(w) * (jnp.abs(w) == hi)))


def _codes(w, scale, pin, bits, full=False):
  _, qmax = fq.code_range(bits, True)
  free = fq.quantize_codes(w, scale, jnp.zeros_like(scale), bits, True)
  wide = jnp.clip(jnp.round(w / scale), -qmax - 1.0, qmax)  # the full grid: one more level
  return jnp.where(full, wide, jnp.where(pin != 0, pin * qmax, free))


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
  scale_rows, pin = _static_grid(w, bits, group, half, full)
  codes = _codes(w, scale_rows, pin, bits, full)
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
  half, full = _half(scale_dtype), _full(grid)
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
  scale_rows, pin = _static_grid(w, bits, group, half, full)
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
      s, p = grid(w1, bits, rows, half, full)
      return jnp.where(rows[:, None], s, sp[0]), jnp.where(rows[:, None], p, sp[1])

    s1, p1 = jax.lax.cond((g > 0) & (i % jnp.maximum(g, 1) == 0), regroup,
                          lambda sp: sp, (s1, p1))
    row, diag = w1[i], hinv1[i, i]
    codes = _codes(row, s1[i], p1[i], bits, full)
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
  half, full = _half(scale_dtype), _full(grid)
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

