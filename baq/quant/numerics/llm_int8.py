"""LLM.int8 (Dettmers et al. 2022) as bitsandbytes' MatMul8bitLt computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from baq.quant.numerics._common import (_F16, _F32, _choice, _int8_matmul, _kernel, _matmul,
                                        _ste)

LLM_INT8_THRESHOLD = 6.0  # transformers' llm_int8_threshold default
OUTLIER_WEIGHTS = ("int8", "float16")  # bitsandbytes >= 0.45 / the paper's fp16 W
MM_DEQUANT_CONST = np.float32(6.200012e-05)  # csrc/kernels.cu: 1 / 127^2
INT8_DEQUANT = np.float32(7.874015718698502e-3)  # int8_vectorwise_dequant: 1 / 127


def _vectorwise(a: jax.Array, axis: int, keep=None):
  """int8_vectorwise_quant: absmax over `axis` (of the `keep` entries).

  The codes are rne(a * 127 / absmax).
  """
  mag = jnp.abs(a) if keep is None else jnp.where(keep, jnp.abs(a), 0.0)
  stats = jnp.max(mag, axis=axis, keepdims=True)
  scale = jnp.where(stats > 0, 127.0 / jnp.where(stats > 0, stats, 1.0), 0.0)
  return jnp.clip(jnp.round(a * scale), -127, 127).astype(jnp.int8), stats


def _llm_int8_weight(w: jax.Array) -> jax.Array:
  """Linear8bitLt's weight (Int8Params: CB, SCB of the fp16 weight), dequantized."""
  cb, scb = _vectorwise(_kernel(w).astype(_F16).astype(_F32), axis=0)
  return ((cb.astype(_F32) * scb) * INT8_DEQUANT).astype(w.dtype)  # int8_vectorwise_dequant


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
  """MatMul8bitLt.forward (bias-free), x cast to float16.

  Args:
    x, w: activations [..., d_in] and kernel [d_in, d_out].
    threshold: outliers are |x| >= threshold (in fp16); 0 turns the
      decomposition off, as in bitsandbytes.
    outlier_weights: "int8": outlier columns meet the dequantized int8 weight
      (int8_mixed_scaled_mm, bitsandbytes >= 0.45); "float16": the fp16
      weight (the paper; has_fp16_weights in bitsandbytes <= 0.44).
    ste: straight-through gradient.

  Returns:
    The float16 result as x.dtype, [..., d_out].
  """
  if not threshold >= 0:
    raise ValueError(f"threshold must be >= 0 (0: no outlier decomposition), got {threshold}.")
  _choice("outlier_weights", outlier_weights, OUTLIER_WEIGHTS)
  a = x.reshape(-1, x.shape[-1]).astype(_F16).astype(_F32)
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
  # kdequant_mm_int32_fp16: fmaf(acc * row * col, MM_DEQUANT_CONST, bias) -> half.
  y = (((acc * sca) * scb) * MM_DEQUANT_CONST).astype(_F16)
  if cols is not None:  # output.addmm(subA, subB): float32 accumulation, one fp16 rounding
    sub_b = (_llm_int8_weight(w) if outlier_weights == "int8" else w).astype(_F16)
    sub_a = jnp.where(cols, a, 0.0).astype(_F16)
    y = (y.astype(_F32) + _matmul(sub_a, sub_b)).astype(_F16)
  y = y.reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)
  return _ste(x, w, y, ste)
