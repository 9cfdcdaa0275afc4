"""torch's dynamic int8 quantization of Linear layers (fbgemm) as it computes it.

Only reduce_range=True (what dynamic.Linear.forward passes) is offered. With
8-bit activations (reduce_range=False) fbgemm's result depends on the CPU:
its AVX2 and AVX-512 kernels without VNNI multiply with vpmaddubsw, which
saturates each sum of two adjacent uint8 x int8 products at 16 bits, while
VNNI CPUs accumulate exactly. 7-bit activations keep every pair sum below
2 * 127 * 128 = 32,512 < 32,767, so the result is the exact integer product on
every CPU, which is what baq computes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from baq.quant.numerics._common import _F32, _int8_matmul, _kernel, _split, _ste, _two_sum

SMALL_SCALE = np.float32(6.1e-5)  # ATen quantized/cpu/QuantUtils.h SMALL_SCALE_THRESHOLD
WEIGHT_EPS = np.float32(np.finfo(np.float32).eps)  # the observers' eps


def _fma_round(x, inv, zp):
  """rne(fl32(x * inv + zp)), one rounding: fbgemm QuantizeAvx2's _mm256_fmadd_ps (LEGACY)."""
  xh, xl = _split(x)
  ih, il = _split(inv)
  s, e = _two_sum(zp, xh * ih)
  return jnp.round(s + (e + ((xh * il + xl * ih) + xl * il)))


def _act_qparams(a: jax.Array, qmax: int):
  """ChooseQuantizationParams(min, max, 0, qmax): the tensor's scale and zero point.

  The scale is fl32((max - min) / qmax) correctly rounded, as torch's double
  division cast to float: one Newton correction of the float32 quotient.
  """
  lo, hi = jnp.minimum(jnp.min(a), 0.0), jnp.maximum(jnp.max(a), 0.0)
  s, e = _two_sum(hi, -lo)
  div = qmax + 0.0 * s  # a runtime divisor: XLA would turn / qmax into * (1/qmax)
  q = s / div
  qh, ql = _split(q)
  scale = q + (((s - qh * qmax) - ql * qmax) + e) / div
  scale = jnp.where((scale == 0) | jnp.isinf(1.0 / scale), np.float32(0.1), scale)
  zp = jnp.clip(jnp.round(-lo / scale), 0, qmax)  # zero_point_from_min (qmin = 0)
  return jnp.maximum(scale, SMALL_SCALE), zp


def _qint8_weight(w: jax.Array, per_channel: bool):
  """MinMaxObserver / PerChannelMinMaxObserver(qint8, symmetric) and quantize_val."""
  w, axis = _kernel(w), (0 if per_channel else None)
  amax = jnp.maximum(-jnp.minimum(jnp.min(w, axis, keepdims=True), 0.0),
                     jnp.maximum(jnp.max(w, axis, keepdims=True), 0.0))
  scale = jnp.maximum(amax / (127.5 + 0.0 * amax), WEIGHT_EPS)  # max / ((127 + 128) / 2)
  q = jnp.clip(jnp.round(w * (1.0 / scale)), -128, 127)  # zero_point + rne(x * inv_scale)
  return q.astype(jnp.int8), scale


def _dynamic_int8_weight(w: jax.Array, *, per_channel: bool = False) -> jax.Array:
  """The dynamic Linear's qint8 weight, dequantized: q * scale."""
  q, scale = _qint8_weight(w.astype(_F32), per_channel)
  return (q.astype(_F32) * scale).astype(w.dtype)


def _dynamic_int8_storage(d_in: int, d_out: int, *, per_channel: bool = False,
                          **compute_options) -> tuple[float, float]:
  """What the dynamic Linear's packed weight holds for a [d_in, d_out] kernel.

  Returns:
    (8 bits per qint8 code, a float32 scale per tensor, or per output
    channel with per_channel). The zero points of the symmetric codes are 0
    and not counted, as baq counts its own symmetric codes; reduce_range
    touches only the activations.
  """
  del d_in, compute_options
  return 8.0, 32.0 * (d_out if per_channel else 1)


def _dynamic_int8_dot(x, w, *, reduce_range: bool = True, per_channel: bool = False,
                      ste: bool = False) -> jax.Array:
  """quantized::linear_dynamic (fbgemm PackedLinearWeight::apply_dynamic), bias-free.

  Args:
    x, w: activations [..., d_in] (one scale, zero point per call) and kernel [d_in, d_out].
    reduce_range: 7-bit activations, as dynamic.Linear.forward passes. Must
      be True: 8-bit activations saturate 16-bit pair sums in fbgemm on CPUs
      without VNNI, so no single result is torch's (see the module docstring).
    per_channel: a weight scale per output channel (per_channel_dynamic_qconfig).
    ste: straight-through gradient.

  Returns:
    float(acc - zp * colsum(Wq)) * (scale_x * scale_w) as x.dtype, [..., d_out].
  """
  if reduce_range is not True:
    raise ValueError("reduce_range must be True: with 8-bit activations (False) fbgemm "
                     "saturates 16-bit pair sums on CPUs without AVX512-VNNI and is exact "
                     "with it, so the result depends on the CPU; baq models the 7-bit one.")
  a = x.reshape(-1, x.shape[-1]).astype(_F32)
  scale, zp = _act_qparams(a, 127)
  qa = jnp.clip(_fma_round(a, 1.0 / scale, zp), 0, 255).astype(jnp.int32)
  qw, sw = _qint8_weight(w.astype(_F32), per_channel)
  col = jnp.sum(qw.astype(jnp.int32), axis=0)
  # uint8 codes as int8 (q - 128) for the int8 product; the shift returns through col.
  raw = _int8_matmul((qa - 128).astype(jnp.int8), qw) + (128 - zp.astype(jnp.int32)) * col
  y = raw.astype(_F32) * (scale * sw)  # ReQuantizeForFloat: float(raw) * (A_scale * B_scale)
  y = y.reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)
  return _ste(x, w, y, ste)
