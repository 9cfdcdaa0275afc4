"""Helpers the numerics share: kernel and option checks, matmuls, straight-through."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_F16, _F32 = jnp.float16, jnp.float32


def _kernel(w: jax.Array) -> jax.Array:
  """w, if a Dense kernel [d_in, d_out] (the runtimes replace Linear layers only)."""
  if w.ndim != 2:
    raise ValueError(f"w must be a [d_in, d_out] Dense kernel, got shape {w.shape}.")
  return w


def _choice(option: str, value, valid) -> None:
  """Raises naming the option and its valid values."""
  if value not in valid:
    raise ValueError(f"{option}={value!r} is not one of {', '.join(map(str, valid))}.")


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b with float32 accumulation (cuBLAS' for half inputs; no TF32)."""
  return jnp.matmul(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=_F32)


def _int8_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """Exact int8 x int8 -> int32 product, as igemmlt / fbgemm accumulate."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)


def _rounded(x: jax.Array) -> jax.Array:
  """x, rounded where it stands, for a runtime that rounds a product before adding to it.

  XLA's CPU compiler contracts a multiply followed by an add into one fused
  multiply-add (one rounding) even across an optimization barrier; a select
  between the product and NaN is an identity it does not see through.
  """
  return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), x)


def _two_sum(a, b):
  """s + e == a + b exactly (Knuth); no multiplications, so no FMA contraction."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _split(a):
  """a == hi + lo, hi the top 12 significand bits: products of halves are exact."""
  hi = lax.bitcast_convert_type(
      lax.bitcast_convert_type(a, jnp.uint32) & np.uint32(0xFFFFF000), _F32)
  return hi, a - hi


def _fma(a, b, c):
  """fl32(a * b + c) with one rounding, whether or not XLA fuses it.

  The product is four exact products of 12-bit halves; they are added to c
  with error-free sums and the errors gathered once, so the result is the
  correctly rounded a * b + c except for ties far below float32's epsilon.
  """
  ah, al = _split(a)
  bh, bl = _split(b)
  s, err = c, jnp.zeros_like(c)
  for term in (ah * bh, ah * bl, al * bh, al * bl):
    s, e = _two_sum(s, term)
    err = err + e
  return s + err


def _ste(x: jax.Array, w: jax.Array, y: jax.Array, ste: bool) -> jax.Array:
  """y forward; the float matmul's gradient if `ste` (y + f - f is exactly y)."""
  if not ste:
    return y
  f = _matmul(x, w.astype(x.dtype)).astype(y.dtype)
  return lax.stop_gradient(y) + (f - lax.stop_gradient(f))
