"""Published quantized-matmul numerics: LLM.int8, NF4/FP4 and torch's dynamic int8.

Each registered `Numeric` has `dot(x, w, **options)`: `x @ w` (x [..., d_in],
w [d_in, d_out], the Flax Dense layout) as that runtime computes it, and
`quantize_weight(w, **options)`: the weight as the runtime stores it,
dequantized. Integer products are exact (int8 x int8 -> int32 in
`lax.dot_general`) and every float rounding of the runtime happens here in
its dtype and order, so results are the runtime's to float32 round-off.

  * `llm_int8`: bitsandbytes' MatMul8bitLt (Dettmers et al. 2022): fp16
    activations; columns with an |x| >= threshold multiplied in fp16, the
    rest vector-wise int8 (row absmax x output-channel absmax).
  * `nf4` / `fp4` (weight-only, QLoRA): bitsandbytes' quantize_4bit, nearest
    code per `blocksize` weights of the torch [out, in] weight, optional
    double quantization of the absmaxes, matmul in compute_dtype.
  * `dynamic_int8`: torch.ao.nn.quantized.dynamic.Linear on fbgemm: uint8
    activations from the tensor's min/max, symmetric qint8 weights.

Options are static Python values (bind them before `jax.jit`); a bad value
raises a ValueError naming the option and its bound. `ste=True` gives the
float matmul's gradient (straight-through), the forward unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from baq.registry import Registry

_F16, _F32 = jnp.float16, jnp.float32
LLM_INT8_THRESHOLD = 6.0  # transformers' llm_int8_threshold default
OUTLIER_WEIGHTS = ("int8", "float16")  # bitsandbytes >= 0.45 / the paper's fp16 W
MM_DEQUANT_CONST = np.float32(6.200012e-05)  # csrc/kernels.cu: 1 / 127^2
INT8_DEQUANT = np.float32(7.874015718698502e-3)  # int8_vectorwise_dequant: 1 / 127
# functional.get_4bit_type("nf4"): create_normal_map(0.9677083), hardcoded there.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
# get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order, / 12.
FP4_CODE = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                    np.float32) / np.float32(12)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # functional.quantize_4bit
NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True)
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
SMALL_SCALE = np.float32(6.1e-5)  # ATen quantized/cpu/QuantUtils.h SMALL_SCALE_THRESHOLD
WEIGHT_EPS = np.float32(np.finfo(np.float32).eps)  # the observers' eps


def _dynamic_map() -> np.ndarray:
  """create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), in torch's float32."""
  data = [np.float32(0), np.float32(1)]
  for i in range(7):
    n = 2**i + 1
    k = np.arange(n, dtype=np.float32)
    step = (np.float32(1) - np.float32(0.1)) / np.float32(n - 1)
    bounds = np.where(np.arange(n) < n // 2, np.float32(0.1) + step * k,
                      np.float32(1) - step * (np.float32(n - 1) - k)).astype(np.float32)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    vals = np.float32(10.0 ** (i - 6)) * means
    data += list(vals) + list(-vals)
  return np.sort(np.array(data, np.float32))


DYNAMIC_CODE = _dynamic_map()
_SORTED = {"nf4": NF4_CODE, "fp4": np.sort(FP4_CODE), "dynamic": DYNAMIC_CODE}
# Nearest code: a value above a midpoint takes the upper code, as torch.bucketize
# in backends/default and the comparisons of dQuantizeNF4 in csrc/kernels.cu.
_BOUNDS = {k: ((c[:-1] + c[1:]) / np.float32(2)).astype(np.float32) for k, c in _SORTED.items()}


@dataclasses.dataclass(frozen=True)
class Numeric:
  """One runtime's quantized matmul (`baq.quant.inject` runs it for a Dense layer).

  Attributes:
    name: the registry name (`QuantSpec.numerics`).
    weight_only: True if only the weight is quantized (activations stay float).
    dot: (x [..., d_in], w [d_in, d_out], **options) -> x @ w as the runtime computes it.
    quantize_weight: (w, **options) -> w as the runtime stores it, dequantized.
    source: the published implementation transcribed.
  """

  name: str
  weight_only: bool
  dot: Callable[..., jax.Array]
  quantize_weight: Optional[Callable[..., jax.Array]]
  source: str


NUMERICS: Registry[Numeric] = Registry("quantizer numerics")


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


def _ste(x: jax.Array, w: jax.Array, y: jax.Array, ste: bool) -> jax.Array:
  """y forward; the float matmul's gradient if `ste` (y + f - f is exactly y)."""
  if not ste:
    return y
  f = _matmul(x, w.astype(x.dtype)).astype(y.dtype)
  return lax.stop_gradient(y) + (f - lax.stop_gradient(f))


# ---------------------------------------------------------------- LLM.int8()
def _vectorwise(a: jax.Array, axis: int, keep=None):
  """int8_vectorwise_quant: absmax over `axis` (of the `keep` entries), codes rne(a * 127/absmax)."""
  mag = jnp.abs(a) if keep is None else jnp.where(keep, jnp.abs(a), 0.0)
  stats = jnp.max(mag, axis=axis, keepdims=True)
  scale = jnp.where(stats > 0, 127.0 / jnp.where(stats > 0, stats, 1.0), 0.0)
  return jnp.clip(jnp.round(a * scale), -127, 127).astype(jnp.int8), stats


def _llm_int8_weight(w: jax.Array) -> jax.Array:
  """Linear8bitLt's weight (Int8Params: CB, SCB of the fp16 weight), dequantized."""
  cb, scb = _vectorwise(_kernel(w).astype(_F16).astype(_F32), axis=0)
  return ((cb.astype(_F32) * scb) * INT8_DEQUANT).astype(w.dtype)  # int8_vectorwise_dequant


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


# ------------------------------------------------------------------ NF4 / FP4
def _blockwise(flat: jax.Array, blocksize: int, kind: str) -> tuple[jax.Array, jax.Array]:
  """quantize_4bit / quantize_blockwise (backends/default): codes, absmax per block."""
  n = flat.shape[0]
  blocks = jnp.pad(flat, (0, -n % blocksize)).reshape(-1, blocksize)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  inv = jnp.where(absmax > 0, 1.0 / jnp.where(absmax > 0, absmax, 1.0), 0.0)
  scaled = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
  return jnp.searchsorted(jnp.asarray(_BOUNDS[kind]), scaled, side="left"), absmax


def _dequant_blocks(codes: jax.Array, absmax: jax.Array, kind: str, n: int) -> jax.Array:
  """dequantize_4bit / dequantize_blockwise: code[q] * absmax[block], float32."""
  return (jnp.asarray(_SORTED[kind])[codes] * absmax[:, None]).reshape(-1)[:n]


def _four_bit_weight(quant_type: str, w: jax.Array, *, blocksize: int = 64,
                     double_quant: bool = False) -> jax.Array:
  """Linear4bit's weight (Params4bit of the torch weight w.T), dequantized.

  Args:
    quant_type: "nf4" or "fp4".
    w: kernel [d_in, d_out]; the blocks run over w.T [out, in], row-major.
    blocksize: weights per absmax block, one of BLOCKSIZES (the last may be partial).
    double_quant: compress_statistics: absmax - mean in 256-blocks, dynamic map.

  Returns:
    The dequantized kernel, shape and dtype of w.
  """
  if blocksize not in BLOCKSIZES:
    raise ValueError(f"blocksize must be a power of two in [{BLOCKSIZES[0]}, {BLOCKSIZES[-1]}] "
                     f"(bitsandbytes' quantize_4bit), got {blocksize}.")
  flat = _kernel(w).T.reshape(-1).astype(_F32)
  codes, absmax = _blockwise(flat, blocksize, quant_type)
  if double_quant:
    offset = jnp.mean(absmax)
    codes2, absmax2 = _blockwise(absmax - offset, NESTED_BLOCKSIZE, "dynamic")
    absmax = _dequant_blocks(codes2, absmax2, "dynamic", absmax.shape[0]) + offset
  dq = _dequant_blocks(codes, absmax, quant_type, flat.shape[0])
  return dq.reshape(w.shape[1], w.shape[0]).T.astype(w.dtype)


def _four_bit_dot(quant_type: str, x, w, *, blocksize: int = 64, double_quant: bool = False,
                  compute_dtype="float32", ste: bool = False) -> jax.Array:
  """Linear4bit.forward: x and the dequantized weight in compute_dtype, float32 accumulation.

  Options as `_four_bit_weight`, plus compute_dtype (one of COMPUTE_DTYPES; the
  product is rounded to it, then cast to x.dtype) and ste.
  """
  try:
    name = np.dtype(compute_dtype).name
  except TypeError:
    name = str(compute_dtype)
  _choice("compute_dtype", name, COMPUTE_DTYPES)
  wq = _four_bit_weight(quant_type, w, blocksize=blocksize, double_quant=double_quant)
  dt = jnp.dtype(name)
  y = _matmul(x.astype(dt), wq.astype(dt)).astype(dt).astype(x.dtype)
  return _ste(x, w, y, ste)


# ------------------------------------------------- torch dynamic quantization
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


def _dynamic_int8_dot(x, w, *, reduce_range: bool = True, per_channel: bool = False,
                      ste: bool = False) -> jax.Array:
  """quantized::linear_dynamic (fbgemm PackedLinearWeight::apply_dynamic), bias-free.

  Args:
    x, w: activations [..., d_in] (one scale, zero point per call) and kernel [d_in, d_out].
    reduce_range: 7-bit activations, as dynamic.Linear.forward passes (True).
    per_channel: a weight scale per output channel (per_channel_dynamic_qconfig).
    ste: straight-through gradient.

  Returns:
    float(acc - zp * colsum(Wq)) * (scale_x * scale_w) as x.dtype, [..., d_out].
  """
  a = x.reshape(-1, x.shape[-1]).astype(_F32)
  scale, zp = _act_qparams(a, 127 if reduce_range else 255)
  qa = jnp.clip(_fma_round(a, 1.0 / scale, zp), 0, 255).astype(jnp.int32)
  qw, sw = _qint8_weight(w.astype(_F32), per_channel)
  col = jnp.sum(qw.astype(jnp.int32), axis=0)
  # uint8 codes as int8 (q - 128) for the int8 product; the shift returns through col.
  raw = _int8_matmul((qa - 128).astype(jnp.int8), qw) + (128 - zp.astype(jnp.int32)) * col
  y = raw.astype(_F32) * (scale * sw)  # ReQuantizeForFloat: float(raw) * (A_scale * B_scale)
  y = y.reshape(*x.shape[:-1], w.shape[-1]).astype(x.dtype)
  return _ste(x, w, y, ste)


for _numeric in (
    Numeric("llm_int8", False, _llm_int8_dot, _llm_int8_weight,
            "bitsandbytes autograd/_functions.py MatMul8bitLt, nn/modules.py Linear8bitLt"),
    Numeric("nf4", True, functools.partial(_four_bit_dot, "nf4"),
            functools.partial(_four_bit_weight, "nf4"),
            "bitsandbytes functional.py quantize_4bit/dequantize_4bit, Linear4bit (QLoRA)"),
    Numeric("fp4", True, functools.partial(_four_bit_dot, "fp4"),
            functools.partial(_four_bit_weight, "fp4"),
            "bitsandbytes functional.py quantize_4bit(quant_type='fp4'), Linear4bit"),
    Numeric("dynamic_int8", False, _dynamic_int8_dot, _dynamic_int8_weight,
            "torch.ao.nn.quantized.dynamic.Linear, quantized::linear_dynamic (fbgemm)"),
):
  NUMERICS.register(_numeric.name)(_numeric)
del _numeric
