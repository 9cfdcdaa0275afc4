"""Uniform fake quantization: pure functions of arrays.

One quantizer serves weights and activations. A tensor `x` is mapped to
integer codes `q = clip(round(x / scale) + zero_point, qmin, qmax)` and back
to `(q - zero_point) * scale`. Gradients pass with the straight-through
estimator, written as `x + stop_gradient(q - x)` on the rounding only, so that
a *learned* scale still receives the LSQ gradient and values clipped away get
none.

The scale is chosen by one of:
  * `absmax`: the largest magnitude (per tensor or per channel);
  * `percentile`: a high percentile of the magnitude, which clips outliers;
  * `learned`: a trainable range `r` (passed in), giving `scale = r / qmax`;
    because the range, not the step, is learned, it stays meaningful when the
    bit-width changes during BAQ training;
  * `mse`: the absmax range shrunk by the ratio, from a grid of
    `MSE_GRID` ratios in [1 - MSE_MAX_SHRINK, 1], that minimises the squared
    rounding error at the tensor's (or channel's) bit-width, as GPTQ's
    `mse` option searches it. At 2 bits absmax makes the restricted
    symmetric grid ternary with most weights at zero; the searched range
    keeps them (it needs the bits, so `range_stats` takes them).
Calibration statistics (`absmax`, `percentile`) are treated as constants for
the gradient, as is usual for weight quantizers.

Bit-widths are arrays broadcastable to the scale (one per tensor or one per
channel) and may be non-integer for the DiffQ-style noise parametrization;
the rounding quantizer itself is only ever called with integer values.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

SCALE_METHODS = ("absmax", "percentile", "learned", "mse")
MSE_GRID = 32  # clip ratios searched by the `mse` scale method
MSE_MAX_SHRINK = 0.8  # ... from 1 down to 1 - MSE_MAX_SHRINK of the absmax range
_EPS = 1e-8


def code_range(bits: jax.Array, symmetric: bool) -> tuple[jax.Array, jax.Array]:
  """Integer code range for `bits` (restricted-range symmetric, or unsigned).

  Args:
    bits: bit-widths (float or int array; integer values expected).
    symmetric: signed restricted range [-(2^(b-1)-1), 2^(b-1)-1] if True,
      else unsigned [0, 2^b - 1].

  Returns:
    (qmin, qmax) as float arrays shaped like `bits`.
  """
  bits = jnp.asarray(bits, jnp.float32)
  if symmetric:
    qmax = 2.0 ** (bits - 1.0) - 1.0
    return -qmax, qmax
  return jnp.zeros_like(bits), 2.0**bits - 1.0


def reduce_axes(ndim: int, channel_axis: Optional[int]) -> tuple[int, ...]:
  """Axes to reduce over for per-tensor (None) or per-channel statistics."""
  if channel_axis is None:
    return tuple(range(ndim))
  channel_axis = channel_axis % ndim
  return tuple(a for a in range(ndim) if a != channel_axis)


def channel_view(v: jax.Array, ndim: int, channel_axis: Optional[int]) -> jax.Array:
  """Reshapes a per-channel vector (or a scalar) to broadcast against x."""
  v = jnp.asarray(v)
  if v.ndim == 0 or channel_axis is None:
    return jnp.reshape(v, (1,) * ndim) if v.size == 1 else v
  shape = [1] * ndim
  shape[channel_axis % ndim] = v.shape[0]
  return jnp.reshape(v, shape)


def range_stats(
    x: jax.Array,
    *,
    symmetric: bool,
    channel_axis: Optional[int],
    method: str = "absmax",
    percentile: float = 99.9,
    learned_range: Optional[jax.Array] = None,
    bits: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """The real interval [lo, hi] that the quantizer maps onto its codes.

  Args:
    x: tensor to quantize.
    symmetric: if True the interval is [-r, r].
    channel_axis: None for per-tensor, else the axis with one range each.
    method: one of SCALE_METHODS.
    percentile: used by `percentile`.
    learned_range: positive range `r` (scalar or per channel) for `learned`.
    bits: the bit-widths, broadcastable against x (`mse` only).

  Returns:
    (lo, hi), each broadcastable against x.
  """
  axes = reduce_axes(x.ndim, channel_axis)
  if method == "learned":
    if learned_range is None:
      raise ValueError("scale method 'learned' needs a learned_range.")
    r = channel_view(jnp.abs(learned_range) + _EPS, x.ndim, channel_axis)
    return (-r, r) if symmetric else (jnp.zeros_like(r), r)
  xs = jax.lax.stop_gradient(x)
  if method in ("absmax", "mse"):
    hi, lo = jnp.max(xs, axes, keepdims=True), jnp.min(xs, axes, keepdims=True)
  elif method == "percentile":
    hi = jnp.percentile(xs, percentile, axis=axes, keepdims=True)
    lo = jnp.percentile(xs, 100.0 - percentile, axis=axes, keepdims=True)
  else:
    raise ValueError(
        f"Unknown scale method {method!r}. Valid: {', '.join(SCALE_METHODS)}."
    )
  if symmetric:
    r = jnp.maximum(jnp.abs(hi), jnp.abs(lo))
    lo, hi = -r, r
  else:  # The interval always contains zero so that zero is exactly representable.
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
  if method == "mse":
    if bits is None:
      raise ValueError("scale method 'mse' needs the bit-widths.")
    lo, hi = _mse_range(xs, lo, hi, jax.lax.stop_gradient(jnp.asarray(bits, jnp.float32)),
                        symmetric, axes)
  return lo, hi


def _mse_range(x, lo, hi, bits, symmetric, axes):
  """[lo, hi] shrunk by the grid ratio of least squared rounding error (per range)."""
  ratios = jnp.linspace(1.0, 1.0 - MSE_MAX_SHRINK, MSE_GRID)

  def error(ratio):
    q = _quant_in_range(x, ratio * lo, ratio * hi, bits, symmetric)
    return jnp.sum(jnp.square(q - x), axes, keepdims=True)

  best = ratios[jnp.argmin(jax.lax.map(error, ratios), axis=0)]  # first of ties: widest
  return best * lo, best * hi


def scale_and_zero_point(
    lo: jax.Array, hi: jax.Array, bits: jax.Array, symmetric: bool
) -> tuple[jax.Array, jax.Array]:
  """Step size and (integer-valued) zero point for an interval and bit-width."""
  qmin, qmax = code_range(bits, symmetric)
  # `+ 0 * hi` keeps the divisor a runtime value: with constant bits XLA
  # would turn x / qmax into x * (1 / qmax), one ulp off, and re-quantizing
  # a quantized tensor would then move some of its values.
  if symmetric:
    return jnp.maximum(hi, _EPS) / (qmax + 0.0 * hi), jnp.zeros_like(hi)
  scale = jnp.maximum(hi - lo, _EPS) / ((qmax - qmin) + 0.0 * hi)
  zero_point = jax.lax.stop_gradient(jnp.round(-lo / scale))
  return scale, zero_point


def quantize_codes(
    x: jax.Array, scale: jax.Array, zero_point: jax.Array, bits: jax.Array,
    symmetric: bool,
) -> jax.Array:
  """Integer codes (as floats) of x; the rounding carries a straight-through gradient."""
  qmin, qmax = code_range(bits, symmetric)
  v = x / scale + zero_point
  codes = jax.lax.stop_gradient(jnp.clip(jnp.round(v), qmin, qmax))
  # Straight-through wherever rounding (not clipping) decides the code; the
  # half-step margin keeps the absmax element's gradient despite float error.
  inside = (v >= qmin - 0.5) & (v <= qmax + 0.5)
  return jnp.where(inside, v + jax.lax.stop_gradient(codes - v), codes)


def dequantize(codes: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
  """Real values represented by integer codes."""
  return (codes - zero_point) * scale


def _range_and_bits(x, bits, symmetric, channel_axis, method, percentile, learned_range):
  """The interval of `range_stats` and the bit-widths shaped to broadcast against x."""
  b = channel_view(bits, x.ndim, channel_axis)
  lo, hi = range_stats(x, symmetric=symmetric, channel_axis=channel_axis, method=method,
                       percentile=percentile, learned_range=learned_range, bits=b)
  return lo, hi, b


def _quant_in_range(x, lo, hi, bits, symmetric):
  scale, zp = scale_and_zero_point(lo, hi, bits, symmetric)
  return dequantize(quantize_codes(x, scale, zp, bits, symmetric), scale, zp)


def fake_quant(
    x: jax.Array,
    bits: jax.Array,
    *,
    symmetric: bool = True,
    channel_axis: Optional[int] = None,
    method: str = "absmax",
    percentile: float = 99.9,
    learned_range: Optional[jax.Array] = None,
) -> jax.Array:
  """Quantizes and dequantizes x at integer `bits` (straight-through gradient).

  Args:
    x: tensor to quantize.
    bits: integer-valued bit-widths, a scalar or one per channel.
    symmetric: signed symmetric codes, or unsigned codes with a zero point.
    channel_axis: None for per-tensor scales, else the per-channel axis.
    method: scale choice, one of SCALE_METHODS.
    percentile: percentile for the `percentile` method.
    learned_range: trainable range for the `learned` method.

  Returns:
    The fake-quantized tensor, same shape and dtype as x.
  """
  lo, hi, b = _range_and_bits(x, bits, symmetric, channel_axis, method, percentile,
                              learned_range)
  return _quant_in_range(x, lo, hi, b, symmetric).astype(x.dtype)


def _activation_qdq(x, bits, symmetric):
  return fake_quant(x, bits, symmetric=symmetric, channel_axis=0, method="absmax")


@jax.jit
def baq_act_qdq_symmetric(x: jax.Array, bits: jax.Array) -> jax.Array:
  return _activation_qdq(x, bits, True)


@jax.jit
def baq_act_qdq_asymmetric(x: jax.Array, bits: jax.Array) -> jax.Array:
  return _activation_qdq(x, bits, False)


def activation_fake_quant(x: jax.Array, bits: int, symmetric: bool) -> jax.Array:
  """Activations fake-quantized with a dynamic per-example abs-max range.

  Each example's codes are independent of the rest of the batch, so a
  deployment can reproduce them. The work is a call of a function with a
  fixed name (`baq_act_qdq_symmetric` / `_asymmetric`), which exporters
  recognise in the traced program (the ONNX export writes it as a
  QuantizeLinear / DequantizeLinear pair).
  """
  fn = baq_act_qdq_symmetric if symmetric else baq_act_qdq_asymmetric
  return fn(x, jnp.float32(bits))


def noise_quant(
    x: jax.Array,
    bits: jax.Array,
    key: jax.Array,
    *,
    symmetric: bool = True,
    channel_axis: Optional[int] = None,
    method: str = "absmax",
    percentile: float = 99.9,
    learned_range: Optional[jax.Array] = None,
) -> jax.Array:
  """DiffQ-style pseudo-quantization noise at (fractional) `bits`.

  Adds uniform noise of one quantization step, `step(b) * U(-1/2, 1/2)`, in
  place of rounding. The step depends smoothly on b, so the task loss gives
  every bit-width a gradient; at evaluation the true rounding quantizer at
  integer bits replaces it.
  """
  lo, hi, b = _range_and_bits(x, bits, symmetric, channel_axis, method, percentile,
                              learned_range)
  qmin, qmax = code_range(b, symmetric)
  step = (hi - lo) / (qmax - qmin)
  u = jax.random.uniform(key, x.shape, x.dtype, -0.5, 0.5)
  y = x + step * u
  if method != "absmax":
    y = jnp.clip(y, lo, hi)
  return y.astype(x.dtype)


def fracbits_quant(
    x: jax.Array,
    bits: jax.Array,
    *,
    symmetric: bool = True,
    channel_axis: Optional[int] = None,
    method: str = "absmax",
    percentile: float = 99.9,
    learned_range: Optional[jax.Array] = None,
) -> jax.Array:
  """FracBits-style interpolation between the quantizers at floor(b) and floor(b)+1.

  `Q(x; b) = (1 - f) Q(x; floor b) + f Q(x; floor b + 1)` with f = b - floor b.
  Its derivative in b is `Q(x; floor b + 1) - Q(x; floor b)`, non-zero even at
  integer b (where f = 0); interpolating between floor and *ceil* instead
  would silently cut the bit gradient at every integer. Arguments as in
  `fake_quant`; the range statistics are computed once for both quantizers.
  """
  lo, hi, b = _range_and_bits(x, bits, symmetric, channel_axis, method, percentile,
                              learned_range)
  b_lo = jax.lax.stop_gradient(jnp.floor(b))
  q_lo = _quant_in_range(x, lo, hi, b_lo, symmetric)
  q_hi = _quant_in_range(x, lo, hi, b_lo + 1.0, symmetric)
  return (q_lo + (b - b_lo) * (q_hi - q_lo)).astype(x.dtype)

