"""NF4 and FP4 (QLoRA) as bitsandbytes' quantize_4bit / Linear4bit compute them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from baq.quant.numerics._common import _F32, _choice, _kernel, _matmul, _ste

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
