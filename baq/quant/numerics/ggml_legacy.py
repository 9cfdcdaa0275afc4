"""llama.cpp's legacy block formats Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 (ggml-quants.c `_ref`).

A block is 32 consecutive weights of a ggml row (one output channel's d_in
weights). Symmetric types store an fp16 scale d and codes q with
w ~ d (q - offset); the `_1` types an fp16 scale d and fp16 minimum m with
w ~ d q + m. Codes come from the float32 scale before its fp16 rounding, as
in the C reference: q = trunc(x / d + offset + 0.5) through the reciprocal
(Q8_0: roundf(x / d)).

Each type has `codes(xp, blocks)` (xp numpy or jax.numpy, blocks float32
[N, 32]) -> fields {"d", "m", "q"}, `pack(fields)` -> uint8 [N, type_size]
in ggml's block layout, `unpack(data)` -> fields, and `dequant(xp, fields)`
-> float32 [N, 32] (ggml's dequantize_row_*). Byte-identical to
gguf.quants.quantize / dequantize (tests/test_ggml_numerics.py).
"""

from __future__ import annotations

import numpy as np

from baq.quant.numerics.ggml_search import F32, barrier, div, first_absmax

QK = 32  # weights per block


def _recip(xp, d):
  """1 / d, 0 where d is 0 (`id = d ? 1.0f/d : 0.0f`)."""
  return xp.where(d == 0, F32(0), F32(1) / xp.where(d == 0, F32(1), d))


def _trunc_codes(xp, v, offset: float, top: int):
  """MIN(top, (int8_t)(v + offset)) for v >= -offset: the C cast truncates."""
  return xp.clip(xp.trunc(v + F32(offset)), 0, top).astype(np.int32)


def _roundf(xp, v):
  """C roundf (half away from zero), exactly in float32."""
  a = xp.abs(v)
  fl = xp.floor(a)
  return (xp.sign(v) * (fl + xp.floor(F32(2) * (a - fl)))).astype(np.int32)


def _symmetric(bits: int):
  """Q4_0 / Q5_0 codes: d = max / -2^(bits-1) of the signed absmax, codes in [0, 2^bits)."""
  half = 2 ** (bits - 1)

  def codes(xp, blocks):
    mx, _ = first_absmax(xp, blocks)
    d = mx / F32(-half)  # a power of two: exact as a product too
    q = _trunc_codes(xp, barrier(xp, blocks * _recip(xp, d)[:, None]), half + 0.5, 2 * half - 1)
    return {"d": d.astype(np.float16), "q": q}

  def dequant(xp, f):
    return f["d"].astype(F32)[:, None] * (f["q"] - half).astype(F32)

  return codes, dequant


def _affine(bits: int):
  """Q4_1 / Q5_1 codes: d = (max - min) / (2^bits - 1), m = min, codes in [0, 2^bits)."""
  top = 2 ** bits - 1

  def codes(xp, blocks):
    lo, hi = xp.min(blocks, axis=-1), xp.max(blocks, axis=-1)
    d = div(xp, hi - lo, top)
    v = barrier(xp, (blocks - lo[:, None]) * _recip(xp, d)[:, None])
    return {"d": d.astype(np.float16), "m": lo.astype(np.float16),
            "q": _trunc_codes(xp, v, 0.5, top)}

  def dequant(xp, f):
    return (barrier(xp, f["d"].astype(F32)[:, None] * f["q"].astype(F32)) +
            f["m"].astype(F32)[:, None])

  return codes, dequant


def _q8_0_codes(xp, blocks):
  d = div(xp, xp.max(xp.abs(blocks), axis=-1), 127)
  return {"d": d.astype(np.float16), "q": _roundf(xp, blocks * _recip(xp, d)[:, None])}


def _q8_0_dequant(xp, f):
  return f["d"].astype(F32)[:, None] * f["q"].astype(F32)


def _fp16_bytes(a) -> np.ndarray:
  return np.asarray(a, np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(q) -> np.ndarray:
  """qs[j] = q[j] & 0xF | (q[j + 16] & 0xF) << 4: the low halves of the block's two halves."""
  q = np.asarray(q, np.uint8)
  return (q[:, :QK // 2] & 0x0F) | ((q[:, QK // 2:] & 0x0F) << 4)


def _high_bits(q) -> np.ndarray:
  """qh: bit j of a little-endian uint32 is bit 4 of code j."""
  return np.packbits((np.asarray(q, np.uint8) >> 4) & 1, axis=-1, bitorder="little")


def _unnibble(qs, qh=None) -> np.ndarray:
  q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)
  if qh is not None:
    q |= np.unpackbits(qh, axis=-1, bitorder="little").astype(np.int32) << 4
  return q


def _pack(fields: dict, order: tuple) -> np.ndarray:
  """The fields' bytes side by side, in the block's field order."""
  parts = {"d": lambda: _fp16_bytes(fields["d"]), "m": lambda: _fp16_bytes(fields["m"]),
           "qh": lambda: _high_bits(fields["q"]), "qs": lambda: _nibbles(fields["q"]),
           "q8": lambda: np.asarray(fields["q"], np.int8).view(np.uint8)}
  return np.concatenate([parts[k]() for k in order], axis=-1)


def _unpack(data: np.ndarray, order: tuple) -> dict:
  sizes = {"d": 2, "m": 2, "qh": 4, "qs": QK // 2, "q8": QK}
  cuts = np.cumsum([sizes[k] for k in order])[:-1]
  raw = dict(zip(order, np.split(np.ascontiguousarray(data), cuts, axis=-1)))
  f = {k: np.ascontiguousarray(raw[k]).view(np.float16)[:, 0] for k in ("d", "m") if k in raw}
  if "q8" in raw:
    f["q"] = raw["q8"].view(np.int8).astype(np.int32)
  else:
    f["q"] = _unnibble(raw["qs"], raw.get("qh"))
  return f


# name -> (codes, dequant, field order in the block, code bits)
LEGACY = {
    "q8_0": (_q8_0_codes, _q8_0_dequant, ("d", "q8"), 8),
    "q5_1": (*_affine(5), ("d", "m", "qh", "qs"), 5),
    "q5_0": (*_symmetric(5), ("d", "qh", "qs"), 5),
    "q4_1": (*_affine(4), ("d", "m", "qs"), 4),
    "q4_0": (*_symmetric(4), ("d", "qs"), 4),
}


def pack(name: str, fields: dict) -> np.ndarray:
  """A legacy type's fields as uint8 [N, type_size] blocks, ggml's layout."""
  return _pack(fields, LEGACY[name][2])


def unpack(name: str, data: np.ndarray) -> dict:
  """uint8 [N, type_size] blocks of a legacy type back to its fields."""
  return _unpack(data, LEGACY[name][2])
