"""llama.cpp's k-quants Q6_K, Q5_K, Q4_K, Q3_K, Q2_K (ggml-quants.c `quantize_row_*_K_ref`).

A super-block is 256 consecutive weights of a ggml row, cut into groups of
16 (Q6_K, Q3_K, Q2_K) or 32 (Q5_K, Q4_K). Each group gets its grid from a
search (`ggml_search`); the groups' scales (and mins) are then quantized
to 4, 6 or 8 bits against fp16 super-block scales, and every code is
recomputed against the stored scales, as the reference does:

  Q6_K  w ~ d sc (q - 32)                q 6 bits, sc int8, d fp16
  Q5_K  w ~ d sc q - dmin m              q 5 bits, sc, m 6 bits, d, dmin fp16
  Q4_K  w ~ d sc q - dmin m              q 4 bits
  Q3_K  w ~ d (sc - 32) (q - 4)          q 3 bits, sc 6 bits, d fp16
  Q2_K  w ~ d sc q - dmin m              q 2 bits, sc, m 4 bits

Each type has `codes(xp, blocks)` (blocks float32 [N, 256]) -> fields,
`pack(fields)` -> uint8 [N, type_size] in ggml's layout, `unpack(data)`
-> fields and `dequant(xp, fields)` -> float32 [N, 256] (dequantize_row_*,
also gguf.quants.dequantize's result).
"""

from __future__ import annotations

import numpy as np

from baq.quant.numerics.ggml_search import (F32, GROUP_MAX_EPS, barrier, div, first_absmax,
                                            make_q3_quants, make_qkx2_quants, make_qx_quants,
                                            nearest_int, seqsum)

QK_K = 256  # weights per super-block


def _safe_inv(xp, c: float, v):
  """c / v where v is not 0, else 0."""
  return xp.where(v != 0, F32(c) / xp.where(v != 0, v, F32(1)), F32(0))


def _recode(xp, L, d_sub, code):
  """The reference's final pass: codes against the stored group scales, where not 0."""
  new = code(xp.where(d_sub != 0, d_sub, F32(1))[:, None])
  return xp.where((d_sub != 0)[:, None], new, L)


def _q2_k_codes(xp, blocks):
  n = blocks.shape[0]
  g = blocks.reshape(-1, 16)
  L, scales, mins = make_qkx2_quants(xp, g, xp.abs(g), 3, -0.5, 0.1, 15, True)
  scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
  max_scale = xp.maximum(xp.max(scales, axis=-1), F32(0))
  max_min = xp.maximum(xp.max(mins, axis=-1), F32(0))
  sc = nearest_int(xp, barrier(xp, _safe_inv(xp, 15, max_scale)[:, None] * scales)) & 0xFF
  sc = xp.where((max_scale > 0)[:, None], sc, 0)
  m = nearest_int(xp, barrier(xp, _safe_inv(xp, 15, max_min)[:, None] * mins))
  byte = xp.where((max_min > 0)[:, None], (sc | (m << 4)) & 0xFF, sc)
  d = div(xp, max_scale, 15).astype(np.float16)
  dmin = div(xp, max_min, 15).astype(np.float16)
  d_sub = (d.astype(F32)[:, None] * (byte & 0xF).astype(F32)).reshape(-1)
  dm = (dmin.astype(F32)[:, None] * (byte >> 4).astype(F32)).reshape(-1)
  L = _recode(xp, L, d_sub,
              lambda ds: xp.clip(nearest_int(xp, (g + dm[:, None]) / ds), 0, 3))
  return {"d": d, "dmin": dmin, "sc": byte.astype(np.int32), "q": L.reshape(n, QK_K)}


def _q2_k_dequant(xp, f):
  n = f["q"].shape[0]
  sc = f["sc"]
  dl = f["d"].astype(F32)[:, None] * (sc & 0xF).astype(F32)
  ml = f["dmin"].astype(F32)[:, None] * (sc >> 4).astype(F32)
  q = f["q"].reshape(n, 16, 16).astype(F32)
  return (barrier(xp, dl[..., None] * q) - ml[..., None]).reshape(n, QK_K)


def _q3_k_codes(xp, blocks):
  n = blocks.shape[0]
  g = blocks.reshape(-1, 16)
  L, scales = make_q3_quants(xp, g, 4)
  scales = scales.reshape(n, 16)
  max_scale, _ = first_absmax(xp, scales)
  some = max_scale != 0
  iscale = xp.where(some, F32(-32) / xp.where(some, max_scale, F32(1)), F32(0))
  l8 = ((nearest_int(xp, barrier(xp, iscale[:, None] * scales)) + 128) & 255) - 128  # int8_t
  sc = xp.where(some[:, None], xp.clip(l8, -32, 31) + 32, 0)
  d = xp.where(some, _safe_inv(xp, 1, iscale), F32(0)).astype(np.float16)
  d_sub = (d.astype(F32)[:, None] * (sc - 32).astype(F32)).reshape(-1)
  L = _recode(xp, L, d_sub, lambda ds: xp.clip(nearest_int(xp, g / ds), -4, 3) + 4)
  return {"d": d, "sc": sc.astype(np.int32), "q": L.reshape(n, QK_K)}


def _q3_k_dequant(xp, f):
  n = f["q"].shape[0]
  dl = f["d"].astype(F32)[:, None] * (f["sc"] - 32).astype(F32)
  q = (f["q"].reshape(n, 16, 16) - 4).astype(F32)
  return (dl[..., None] * q).reshape(n, QK_K)


def _qk_codes(nmax: int, rmin: float, nstep: int):
  """Q4_K (nmax 15) / Q5_K (31): groups of 32, 6-bit scales and mins."""

  def codes(xp, blocks):
    n = blocks.shape[0]
    g = blocks.reshape(-1, 32)
    av_x = xp.sqrt(seqsum(xp, barrier(xp, g * g)) / F32(32))
    L, scales, mins = make_qkx2_quants(xp, g, av_x[:, None] + xp.abs(g), nmax, rmin, 0.1,
                                       nstep, False)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = xp.maximum(xp.max(scales, axis=-1), F32(0))
    max_min = xp.maximum(xp.max(mins, axis=-1), F32(0))
    six = lambda top, v: xp.minimum(
        nearest_int(xp, barrier(xp, _safe_inv(xp, 63, top)[:, None] * v)) & 0xFF, 63)
    ls, lm = six(max_scale, scales), six(max_min, mins)
    d = div(xp, max_scale, 63).astype(np.float16)
    dmin = div(xp, max_min, 63).astype(np.float16)
    d_sub = (d.astype(F32)[:, None] * ls.astype(F32)).reshape(-1)
    dm = (dmin.astype(F32)[:, None] * lm.astype(F32)).reshape(-1)
    L = _recode(xp, L, d_sub,
                lambda ds: xp.clip(nearest_int(xp, (g + dm[:, None]) / ds), 0, nmax))
    return {"d": d, "dmin": dmin, "sc": ls.astype(np.int32), "m": lm.astype(np.int32),
            "q": L.reshape(n, QK_K)}

  return codes


def _qk_dequant(xp, f):
  n = f["q"].shape[0]
  d1 = f["d"].astype(F32)[:, None] * f["sc"].astype(F32)
  m1 = f["dmin"].astype(F32)[:, None] * f["m"].astype(F32)
  q = f["q"].reshape(n, 8, 32).astype(F32)
  return (barrier(xp, d1[..., None] * q) - m1[..., None]).reshape(n, QK_K)


def _q6_k_codes(xp, blocks):
  n = blocks.shape[0]
  g = blocks.reshape(-1, 16)
  L, scales = make_qx_quants(xp, g, 32)
  scales = scales.reshape(n, 16)
  max_scale, max_abs = first_absmax(xp, scales)
  zero = max_abs < GROUP_MAX_EPS
  iscale = F32(-128) / xp.where(zero, F32(1), max_scale)
  d = xp.where(zero, F32(0), F32(1) / iscale).astype(np.float16)
  sc = xp.minimum(nearest_int(xp, barrier(xp, iscale[:, None] * scales)), 127)
  sc = xp.where(zero[:, None], 0, ((sc + 128) & 255) - 128)  # int8_t
  d_sub = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
  L = _recode(xp, L, d_sub, lambda ds: xp.clip(nearest_int(xp, g / ds), -32, 31) + 32)
  L = xp.where(xp.repeat(zero, 16)[:, None], 0, L)
  return {"d": d, "sc": sc.astype(np.int32), "q": L.reshape(n, QK_K)}


def _q6_k_dequant(xp, f):
  n = f["q"].shape[0]
  d1 = f["d"].astype(F32)[:, None] * f["sc"].astype(F32)
  q = (f["q"].reshape(n, 16, 16) - 32).astype(F32)
  return (d1[..., None] * q).reshape(n, QK_K)


# ------------------------------------------------------------------ bytes
def _f16(a) -> np.ndarray:
  return np.asarray(a, np.float16).reshape(-1, 1).view(np.uint8)


def _crumbs(q) -> np.ndarray:
  """2-bit codes: byte l of each 128 holds codes l, l+32, l+64, l+96 (bits 0, 2, 4, 6)."""
  q = np.asarray(q, np.uint8).reshape(-1, 2, 4, 32) & 3
  return np.bitwise_or.reduce(q << np.array([0, 2, 4, 6], np.uint8)[:, None], axis=2).reshape(
      -1, 64)


def _uncrumb(qs) -> np.ndarray:
  q = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3
  return q.reshape(-1, QK_K).astype(np.int32)


def _bit_planes(bits) -> np.ndarray:
  """bit b of byte j: bits[32 b + j] (Q3_K's hmask, Q5_K's qh)."""
  b = np.asarray(bits, np.uint8).reshape(-1, 8, 32)
  return np.bitwise_or.reduce(b << np.arange(8, dtype=np.uint8)[:, None], axis=1)


def _unplane(data) -> np.ndarray:
  return ((data[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(-1, QK_K)


def _nibble_pairs(q) -> np.ndarray:
  """Byte l of each 64 codes: code l (low nibble), code l + 32 (high)."""
  q = np.asarray(q, np.uint8).reshape(-1, 4, 2, 32) & 0x0F
  return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _unnibble(qs) -> np.ndarray:
  q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
  return (q & 0x0F).reshape(-1, QK_K).astype(np.int32)


def _scales12(sc, m) -> np.ndarray:
  """Q4_K / Q5_K: eight 6-bit scales and mins in 12 bytes (get_scale_min_k4's inverse)."""
  sc, m = np.asarray(sc, np.uint8), np.asarray(m, np.uint8)
  hi_s, hi_m = (sc[:, 4:] >> 4) << 6, (m[:, 4:] >> 4) << 6
  return np.concatenate([sc[:, :4] | hi_s, m[:, :4] | hi_m,
                         (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], axis=-1)


def _unscales12(b):
  sc = np.concatenate([b[:, :4] & 63, (b[:, 8:] & 0x0F) | ((b[:, :4] >> 6) << 4)], axis=-1)
  m = np.concatenate([b[:, 4:8] & 63, (b[:, 8:] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=-1)
  return sc.astype(np.int32), m.astype(np.int32)


def _q3_scales(sc) -> np.ndarray:
  """Q3_K: sixteen 6-bit scales: low nibbles in bytes 0-7, high crumbs in bytes 8-11."""
  sc = np.asarray(sc, np.uint8)
  low = (sc[:, :8] & 0x0F) | ((sc[:, 8:] & 0x0F) << 4)
  high = np.bitwise_or.reduce((sc.reshape(-1, 4, 4) >> 4) << (2 * np.arange(4, dtype=np.uint8)
                                                                )[:, None], axis=1)
  return np.concatenate([low, high], axis=-1)


def _q3_unscales(b):
  low = np.concatenate([b[:, :8] & 0x0F, b[:, :8] >> 4], axis=-1)
  high = (b[:, None, 8:] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
  return (low | (high.reshape(-1, 16) << 4)).astype(np.int32)


def _q6_pack(q) -> tuple:
  q = np.asarray(q, np.uint8).reshape(-1, 2, 4, 32)
  ql = np.concatenate([(q[:, :, 0] & 0x0F) | ((q[:, :, 2] & 0x0F) << 4),
                       (q[:, :, 1] & 0x0F) | ((q[:, :, 3] & 0x0F) << 4)], axis=-1)
  qh = np.bitwise_or.reduce((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=2)
  return ql.reshape(-1, 128), qh.reshape(-1, 64)


def _q6_unpack(ql, qh):
  low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 0x0F
  high = (qh.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
  return (low.reshape(-1, 2, 4, 32) | (high << 4)).reshape(-1, QK_K).astype(np.int32)


def pack(name: str, f: dict) -> np.ndarray:
  """A k-quant's fields as uint8 [N, type_size] super-blocks, ggml's layout."""
  q = np.asarray(f["q"])
  if name == "q2_k":
    parts = [np.asarray(f["sc"], np.uint8), _crumbs(q), _f16(f["d"]), _f16(f["dmin"])]
  elif name == "q3_k":
    parts = [_bit_planes(q > 3), _crumbs(q), _q3_scales(f["sc"]), _f16(f["d"])]
  elif name == "q6_k":
    parts = [*_q6_pack(q), np.asarray(f["sc"], np.int8).view(np.uint8), _f16(f["d"])]
  else:
    qh = [_bit_planes(q >> 4)] if name == "q5_k" else []
    parts = [_f16(f["d"]), _f16(f["dmin"]), _scales12(f["sc"], f["m"]), *qh, _nibble_pairs(q)]
  return np.concatenate(parts, axis=-1)


def unpack(name: str, data: np.ndarray) -> dict:
  """uint8 [N, type_size] super-blocks of a k-quant back to its fields."""
  b = np.ascontiguousarray(data)
  h = lambda i: np.ascontiguousarray(b[:, i:i + 2]).view(np.float16)[:, 0]
  if name == "q2_k":
    return {"sc": b[:, :16].astype(np.int32), "q": _uncrumb(b[:, 16:80]), "d": h(80),
            "dmin": h(82)}
  if name == "q3_k":
    q = _uncrumb(b[:, 32:96]) + 4 * _unplane(b[:, :32]).astype(np.int32)
    return {"q": q, "sc": _q3_unscales(b[:, 96:108]), "d": h(108)}
  if name == "q6_k":
    return {"q": _q6_unpack(b[:, :128], b[:, 128:192]),
            "sc": b[:, 192:208].view(np.int8).astype(np.int32), "d": h(208)}
  sc, m = _unscales12(b[:, 4:16])
  q = _unnibble(b[:, -128:])
  if name == "q5_k":
    q = q + 16 * _unplane(b[:, 16:48]).astype(np.int32)
  return {"d": h(0), "dmin": h(2), "sc": sc, "m": m, "q": q}


# name -> (codes, dequant, code bits)
KQUANTS = {
    "q6_k": (_q6_k_codes, _q6_k_dequant, 6),
    "q5_k": (_qk_codes(31, -0.5, 15), _qk_dequant, 5),
    "q4_k": (_qk_codes(15, -1.0, 20), _qk_dequant, 4),
    "q3_k": (_q3_k_codes, _q3_k_dequant, 3),
    "q2_k": (_q2_k_codes, _q2_k_dequant, 2),
}
