"""Helpers the numerics share: kernel and option checks, matmuls, straight-through."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def _ste(x: jax.Array, w: jax.Array, y: jax.Array, ste: bool) -> jax.Array:
  """y forward; the float matmul's gradient if `ste` (y + f - f is exactly y)."""
  if not ste:
    return y
  f = _matmul(x, w.astype(x.dtype)).astype(y.dtype)
  return lax.stop_gradient(y) + (f - lax.stop_gradient(f))
