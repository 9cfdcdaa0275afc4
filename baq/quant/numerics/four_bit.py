"""NF4 and FP4 (QLoRA) as bitsandbytes 0.50's quantize_4bit / Linear4bit compute them on the CPU.

  * quantize_4bit (backends/default, torch): per block of the torch [out, in]
    weight, codes by torch.bucketize over the sorted codes' midpoints of
    x * (1 / absmax), the last partial block by a true division x / absmax
    (its absmax clamped to >= 1e-38, as stored); dequantize_4bit is
    code * absmax in float32.
  * double quantization (compress_statistics): the offset is torch's float32
    mean of the absmaxes, summed in ATen's cascade order (`_torch_sum`), and
    absmax - offset is quantized in 256-blocks by the CPU library's
    quantize_cpu_impl: not the nearest code but a 65,536-bin lookup table
    (csrc/cpu_ops.cpp build_quantize_lut), over `DYNAMIC_CODE`, the map
    create_dynamic_map() builds on a vectorising CPU (`_dynamic_map`).
  * fp4 follows the CPU path's midpoints (x above a midpoint takes the upper
    code). The CUDA kernel dQuantizeFP4 compares with truncated constants
    (0.29166667, 0.583333, 0.8333333, 0.4166667, 0.0859375, 0.20833333,
    0.00260417), 1 to 14 float32 ulp from those midpoints, so a weight in
    that sliver gets the neighbouring code on a GPU; baq does not model it.
  * Linear4bit on an AVX512-BF16 CPU in inference runs a fused bfloat16
    kernel (absmax in bfloat16); baq's dot is MatMul4Bit's dequantize then
    linear in compute_dtype (training mode, GPUs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from baq.quant.numerics._aten import cascade_sum, linspace
from baq.quant.numerics._common import _F32, _choice, _kernel, _matmul, _rounded, _ste

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


def _dynamic_map() -> np.ndarray:
  """create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), in torch's float32."""
  data = [np.float32(0), np.float32(1)]
  for i in range(7):
    n = 2**i + 1
    bounds = linspace(0.1, 1.0, n)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2)
    vals = np.float32(10.0 ** (i - 6)) * means
    data += list(vals) + list(-vals)
  return np.sort(np.array(data, np.float32))


DYNAMIC_CODE = _dynamic_map()
_SORTED = {"nf4": NF4_CODE, "fp4": np.sort(FP4_CODE)}
# Nearest code: a value above a midpoint takes the upper code, as torch.bucketize
# in backends/default (quantize_4bit, the CPU path).
_BOUNDS = {k: ((c[:-1] + c[1:]) / np.float32(2)).astype(np.float32) for k, c in _SORTED.items()}
_MIN_ABSMAX = np.float32(1e-38)  # backends/default quantize_4bit: absmax.clamp(min=1e-38)


def _dynamic_lut(code: np.ndarray) -> np.ndarray:
  """build_quantize_lut (csrc/cpu_ops.cpp): 65,536 bins over [-1, 1] -> code index.

  Bin i stands for -1 + 2i / 65535 and takes the first code whose midpoint
  with the next code is not below it.
  """
  mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
  i = np.arange(65536, dtype=np.float32)
  val = (np.float32(-1) + (np.float32(2) * i) / np.float32(65535)).astype(np.float32)
  return np.searchsorted(mid, val, side="left").astype(np.int32)


_DYNAMIC_LUT = _dynamic_lut(DYNAMIC_CODE)


def _blockwise(flat: jax.Array, blocksize: int, kind: str) -> tuple[jax.Array, jax.Array]:
  """quantize_4bit (backends/default): codes, absmax per block of `flat`.

  Full blocks are scaled by x * (1 / absmax), the last partial block by a
  true division x / absmax, as bitsandbytes writes them; a partial block's
  absmax is stored clamped to 1e-38, a full block's as it is.
  """
  n = flat.shape[0]
  full = n - n % blocksize
  blocks = flat[:full].reshape(-1, blocksize)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  scaled = (blocks * (1.0 / jnp.maximum(absmax, _MIN_ABSMAX))[:, None]).reshape(-1)
  if full < n:
    am = jnp.maximum(jnp.max(jnp.abs(flat[full:])), _MIN_ABSMAX)
    absmax = jnp.concatenate([absmax, am[None]])
    rest = flat[full:]
    # A runtime divisor: XLA turns x / broadcast(am) into x * (1 / am).
    scaled = jnp.concatenate([scaled, rest / (am + 0.0 * rest)])
  scaled = jnp.clip(scaled, -1.0, 1.0)
  return jnp.searchsorted(jnp.asarray(_BOUNDS[kind]), scaled, side="left"), absmax


def _dynamic_blockwise(flat: jax.Array) -> tuple[jax.Array, jax.Array]:
  """quantize_blockwise on the CPU (quantize_cpu_impl) in NESTED_BLOCKSIZE blocks.

  absmax from 0; an all-zero block gets code 0; otherwise the code of the
  lookup-table bin of v = x * (1 / absmax): trunc((v + 1) * 0.5 * 65535 + 0.5).
  (Whether the compiler fuses the last multiply-add changes no code: the
  bins either way agree at every one of the table's code changes.)
  """
  n = flat.shape[0]
  blocks = jnp.pad(flat, (0, -n % NESTED_BLOCKSIZE)).reshape(-1, NESTED_BLOCKSIZE)
  absmax = jnp.max(jnp.abs(blocks), axis=1)
  inv = 1.0 / jnp.where(absmax > 0, absmax, 1.0)
  v = jnp.clip(blocks * inv[:, None], -1.0, 1.0)
  idx = (((v + 1.0) * np.float32(0.5)) * np.float32(65535) + np.float32(0.5)).astype(jnp.int32)
  codes = jnp.where(absmax[:, None] > 0, jnp.asarray(_DYNAMIC_LUT)[idx], 0)
  return codes.reshape(-1)[:n], absmax


def _dequant_blocks(codes: jax.Array, absmax: jax.Array, table, blocksize: int) -> jax.Array:
  """dequantize_4bit / dequantize_blockwise: table[q] * absmax[block], float32."""
  n = codes.shape[0]
  vals = jnp.pad(jnp.asarray(table)[codes], (0, -n % blocksize)).reshape(-1, blocksize)
  return (vals * absmax[:, None]).reshape(-1)[:n]


def _four_bit_weight(quant_type: str, w: jax.Array, *, blocksize: int = 64,
                     double_quant: bool = False) -> jax.Array:
  """Linear4bit's weight (Params4bit of the torch weight w.T), dequantized.

  Args:
    quant_type: "nf4" or "fp4".
    w: kernel [d_in, d_out]; the blocks run over w.T [out, in], row-major.
    blocksize: weights per absmax block, one of BLOCKSIZES (the last may be partial).
    double_quant: compress_statistics: absmax - mean in 256-blocks, dynamic map
      (bitsandbytes' CPU lookup table).

  Returns:
    The dequantized kernel, shape and dtype of w.
  """
  if blocksize not in BLOCKSIZES:
    raise ValueError(f"blocksize must be a power of two in [{BLOCKSIZES[0]}, {BLOCKSIZES[-1]}] "
                     f"(bitsandbytes' quantize_4bit), got {blocksize}.")
  flat = _kernel(w).T.reshape(-1).astype(_F32)
  codes, absmax = _blockwise(flat, blocksize, quant_type)
  if double_quant:  # compress_statistics
    total = cascade_sum(absmax)  # torch's absmax.mean(): sum, then / n at run time
    offset = total / (np.float32(absmax.shape[0]) + 0.0 * total)
    codes2, absmax2 = _dynamic_blockwise(absmax - offset)
    # dequantize_blockwise's product is rounded before `absmax += offset`.
    absmax = _rounded(_dequant_blocks(codes2, absmax2, DYNAMIC_CODE, NESTED_BLOCKSIZE)) + offset
  dq = _dequant_blocks(codes, absmax, _SORTED[quant_type], blocksize)
  return dq.reshape(w.shape[1], w.shape[0]).T.astype(w.dtype)


def _four_bit_storage(quant_type: str, d_in: int, d_out: int, *, blocksize: int = 64,
                      double_quant: bool = False, **compute_options) -> tuple[float, float]:
  """What Linear4bit stores for a [d_in, d_out] kernel (the compute options change nothing).

  Returns:
    (4 bits per weight code, bits of the absmaxes): one float32 absmax per
    block; with double_quant one 8-bit code per block, one float32 absmax
    per NESTED_BLOCKSIZE blocks and the float32 offset. The fixed code
    tables are the format's constants, not the weight's, and are not counted.
  """
  del quant_type, compute_options
  blocks = -(-d_in * d_out // blocksize)
  if not double_quant:
    return 4.0, 32.0 * blocks
  return 4.0, 8.0 * blocks + 32.0 * -(-blocks // NESTED_BLOCKSIZE) + 32.0


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
