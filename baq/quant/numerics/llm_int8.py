"""LLM.int8 (Dettmers et al. 2022) as bitsandbytes 0.50's MatMul8bitLt computes it on the CPU.

The int8 path follows bitsandbytes' torch kernels (backends/default/ops.py,
used on the CPU; torch._int_mm for the int32 product on AVX-512):
  * int8_vectorwise_quant: codes rne(a * (127 / absmax)), where torch's
    scalar-by-tensor division `127.0 / t` is `t.reciprocal() * 127`
    (Tensor.__rtruediv__): two float32 roundings, which on exact .5 ties
    round the code the other way from a true division.
  * int8_mm_dequant: float32(acc) * (row_absmax * col_absmax) * 6.200124e-05,
    rounded once to the input's dtype (no float16 rounding for float32 or
    bfloat16 inputs; the CUDA kernel's fp16 output and 6.200012e-05 differ).
  * int8_mixed_scaled_mm: the outlier columns of the input, in its own
    dtype, times the dequantized int8 weight cast to that dtype, added with
    `addmm`: on the CPU a float32 fused multiply-add chain over the outlier
    columns in order, added to the int8 part, one rounding to the input's
    dtype (`_addmm_chain`; its gradient is the float matmul's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from baq.quant.numerics._common import (_F16, _F32, _choice, _fma, _int8_matmul, _kernel,
                                        _matmul, _rounded, _ste)

LLM_INT8_THRESHOLD = 6.0  # transformers' llm_int8_threshold default
OUTLIER_WEIGHTS = ("int8", "float16")  # bitsandbytes >= 0.45 / the paper's fp16 W
MM_DEQUANT_CONST = np.float32(6.200124e-05)  # backends/default int8_mm_dequant (~1 / 127^2)
INT8_DEQUANT = np.float32(7.874015718698502e-3)  # int8_vectorwise_dequant: 1 / 127


def _vectorwise(a: jax.Array, axis: int, keep=None):
  """int8_vectorwise_quant: codes and absmax over `axis` (of the `keep` entries).

  The scale is reciprocal(absmax) * 127 in float32, as torch evaluates
  `127.0 / absmax`; an all-zero vector gets codes 0 (torch's 0 * inf is NaN).
  """
  mag = jnp.abs(a) if keep is None else jnp.where(keep, jnp.abs(a), 0.0)
  stats = jnp.max(mag, axis=axis, keepdims=True)
  inv = 1.0 / jnp.where(stats > 0, stats, 1.0)
  scale = jnp.where(stats > 0, inv * np.float32(127), 0.0)
  return jnp.clip(jnp.round(a * scale), -127, 127).astype(jnp.int8), stats


def _dequant(cb: jax.Array, scb: jax.Array) -> jax.Array:
  """int8_vectorwise_dequant: CB * SCB * (1 / 127), float32."""
  return (cb.astype(_F32) * scb) * INT8_DEQUANT


def _llm_int8_weight(w: jax.Array) -> jax.Array:
  """Linear8bitLt's weight (Int8Params: CB, SCB of the fp16 weight), dequantized."""
  cb, scb = _vectorwise(_kernel(w).astype(_F16).astype(_F32), axis=0)
  return _dequant(cb, scb).astype(w.dtype)


def _addmm_chain(y: jax.Array, sub_a: jax.Array, sub_b: jax.Array, cols: jax.Array):
  """y + sub_a @ sub_b as torch.addmm on the CPU sums it: float32 forward, no gradient.

  The product accumulates from 0 in column order, one fused multiply-add per
  outlier column (MKL's sgemm; the non-outlier columns of sub_a are zero and
  are skipped), then is added to y once. Only the outlier columns are
  visited, so the loop is as short as their count.
  """
  idx = jnp.nonzero(cols, size=cols.shape[0], fill_value=0)[0]
  a, b = sub_a.astype(_F32), sub_b.astype(_F32)

  def step(i, acc):
    k = idx[i]
    return _fma(a[:, k][:, None], b[k][None, :], acc)

  acc = lax.fori_loop(0, jnp.sum(cols), step, jnp.zeros(y.shape, _F32))
  return lax.stop_gradient(_rounded(y.astype(_F32)) + acc)


def _llm_int8_storage(d_in: int, d_out: int, *, outlier_weights: str = "int8",
                      **compute_options) -> tuple[float, float]:
  """What Linear8bitLt stores for a [d_in, d_out] kernel (the threshold changes nothing).

  Returns:
    "int8": (8 bits per weight code, a float32 absmax per output channel:
    Int8Params' CB and SCB). "float16": (16, 0): the fp16 weight, which the
    outlier columns need and whose int8 copy is made per call
    (has_fp16_weights).
  """
  del d_in, compute_options
  return (8.0, 32.0 * d_out) if outlier_weights == "int8" else (16.0, 0.0)


def _llm_int8_dot(x, w, *, threshold: float = LLM_INT8_THRESHOLD,
                  outlier_weights: str = "int8", ste: bool = False) -> jax.Array:
  """MatMul8bitLt.forward (bias-free) on bitsandbytes' CPU path.

  Args:
    x, w: activations [..., d_in] and kernel [d_in, d_out]. The int8 codes
      come from x cast to float16, as bitsandbytes casts it.
    threshold: outliers are |x| >= threshold (in fp16); 0 turns the
      decomposition off, as in bitsandbytes.
    outlier_weights: "int8": outlier columns of x, in x.dtype, meet the
      dequantized int8 weight in x.dtype (int8_mixed_scaled_mm, bitsandbytes
      >= 0.45); "float16": everything in float16 with the fp16 weight (the
      paper; has_fp16_weights in bitsandbytes <= 0.44), output rounded to
      float16.
    ste: straight-through gradient.

  Returns:
    The result in x.dtype, [..., d_out].
  """
  if not threshold >= 0:
    raise ValueError(f"threshold must be >= 0 (0: no outlier decomposition), got {threshold}.")
  _choice("outlier_weights", outlier_weights, OUTLIER_WEIGHTS)
  fp16 = outlier_weights == "float16"
  out_dtype = _F16 if fp16 else x.dtype
  x2 = x.reshape(-1, x.shape[-1])
  a = x2.astype(_F16).astype(_F32)
  cb, scb = _vectorwise(_kernel(w).astype(_F16).astype(_F32), axis=0)
  keep = cols = None
  if threshold > 0:
    with np.errstate(over="ignore"):
      bound = np.float32(np.float16(threshold))  # torch compares in the tensor's fp16
    keep = jnp.abs(a) < bound
    cols = ~jnp.all(keep, axis=0)  # a column with any outlier
  ca, sca = _vectorwise(a, 1, keep)
  if cols is not None:
    ca = jnp.where(cols, jnp.int8(0), ca)
  acc = _int8_matmul(ca, cb).astype(_F32)
  y = ((acc * (sca * scb)) * MM_DEQUANT_CONST).astype(out_dtype)  # int8_mm_dequant
  if cols is not None:  # output.addmm(subA, subB): float32 accumulation, one rounding
    sub_b = w.astype(_F16) if fp16 else _dequant(cb, scb).astype(x.dtype)
    sub_a = jnp.where(cols, a if fp16 else x2, 0).astype(sub_b.dtype)
    # The loop's value, with the gradient of the float matmul (m - m is exactly 0).
    m = _matmul(sub_a, sub_b)
    y = (_addmm_chain(y, sub_a, sub_b, cols) + (m - lax.stop_gradient(m))).astype(out_dtype)
  y = y.reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)
  return _ste(x, w, y, ste)
