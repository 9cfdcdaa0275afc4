"""GPTQ's bit layout: packing codes and zero points into int32 words, and back.

See the package docstring for the layout and the zero-point formats.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

ALLOWED_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
WEIGHTS_FILE = "model.safetensors"
WORD = 32  # GPTQ packs into int32 words; d_in and d_out must be multiples of it
_REQUIRED = ("qweight", "qzeros", "scales")  # g_idx defaults to i // group_size


def _check_bits(bits: int, where: str = "") -> int:
  if bits not in ALLOWED_BITS:
    raise ValueError(f"{where}bits={bits} has no GPTQ packing; allowed bits are "
                     f"{', '.join(map(str, ALLOWED_BITS))}.")
  return int(bits)


def _pack_rows(u: np.ndarray, bits: int) -> np.ndarray:
  """[n, m] codes -> int32 [n*bits/32, m], packed along axis 0 (see module doc)."""
  n, m = u.shape
  u = u.astype(np.uint64).reshape(n // WORD, WORD, m)
  words = np.zeros((n // WORD, bits, m), np.uint64)
  for j in range(WORD):
    w, off = divmod(j * bits, WORD)
    words[:, w] |= (u[:, j] << np.uint64(off)) & np.uint64(0xFFFFFFFF)
    if off + bits > WORD:  # the code's high bits open the next word
      words[:, w + 1] |= u[:, j] >> np.uint64(WORD - off)
  return words.reshape(-1, m).astype(np.uint32).view(np.int32)


def _words(n: int, bits: int) -> int:
  """int32 words that hold n codes of `bits` (the last one padded, as GPTQModel packs
  a dimension that is no multiple of 32)."""
  return -(-n * bits // WORD)


def _unpack_rows(q: np.ndarray, bits: int, n: int | None = None) -> np.ndarray:
  """Inverse of `_pack_rows`: int32 [words, m] -> int64 codes [n, m] (n: all the words
  hold; a padded last word, as GPTQModel writes one, gives its first codes)."""
  m = q.shape[1]
  q = np.asarray(q, np.int32)
  if q.shape[0] % bits:
    q = np.concatenate([q, np.zeros((-q.shape[0] % bits, m), np.int32)])
  words = q.view(np.uint32).astype(np.uint64).reshape(-1, bits, m)
  out = np.empty((words.shape[0], WORD, m), np.uint64)
  for j in range(WORD):
    w, off = divmod(j * bits, WORD)
    v = words[:, w] >> np.uint64(off)
    if off + bits > WORD:
      v |= words[:, w + 1] << np.uint64(WORD - off)
    out[:, j] = v & np.uint64(2**bits - 1)
  return out.reshape(-1, m)[:n].astype(np.int64)


def _pack_cols(z: np.ndarray, bits: int) -> np.ndarray:
  return np.ascontiguousarray(_pack_rows(np.ascontiguousarray(z.T), bits).T)


def _unpack_cols(qz: np.ndarray, bits: int, n: int | None = None) -> np.ndarray:
  return np.ascontiguousarray(_unpack_rows(np.ascontiguousarray(qz.T), bits, n).T)


def _ints(x: Any, what: str, hi: int, lo: int = 0) -> np.ndarray:
  a = np.asarray(x)
  if not np.array_equal(a, np.rint(a)) or a.size and (a.min() < lo or a.max() > hi):
    raise ValueError(f"{what} must be integers in [{lo}, {hi}].")
  return a.astype(np.int64)


def pack_layer(codes, scales, zeros, bits: int, group_size: int,
               g_idx=None) -> dict[str, np.ndarray]:
  """Packs one layer exactly as AutoGPTQ / GPTQModel's `pack` lay it out.

  Args:
    codes: unsigned codes in [0, 2^bits - 1], [d_in, d_out].
    scales: [n_groups, d_out] (or [d_out] with one group); stored as float16.
    zeros: unsigned zero points [n_groups, d_out] (or [d_out]).
    bits: 2, 3, 4 or 8.
    group_size: input rows per group; -1 for one group.
    g_idx: [d_in] group of each input row (act order); default i // group_size.

  Returns:
    {qweight, qzeros, scales, g_idx}, qzeros in the "gptq_v2" form (zeros as
    is); `write_checkpoint` stores it in the requested checkpoint_format.
  """
  bits = _check_bits(bits)
  codes = _ints(codes, "codes", 2**bits - 1)
  if codes.ndim != 2 or codes.shape[0] % WORD or codes.shape[1] % WORD:
    raise ValueError(f"codes {codes.shape}: GPTQ needs [d_in, d_out] with both "
                     f"multiples of {WORD} (int32 words).")
  d_in, d_out = codes.shape
  g = d_in if group_size == -1 else int(group_size)
  if g <= 0 or d_in % g:
    raise ValueError(f"group_size {group_size} does not divide d_in={d_in}.")
  n_groups = d_in // g
  s16, zeros = np.atleast_2d(scales).astype(np.float16), np.atleast_2d(zeros)
  for what, a in (("scales", s16), ("zeros", zeros)):
    if a.shape != (n_groups, d_out):
      raise ValueError(f"{what} {a.shape} disagree with codes {codes.shape}: "
                       f"expected ({n_groups}, {d_out}) for group_size {group_size}.")
  if not np.all(np.isfinite(s16)):
    raise ValueError("scales are not finite in float16 (|scale| > 65504 or NaN).")
  g_idx = np.arange(d_in) // g if g_idx is None else _ints(g_idx, "g_idx", n_groups - 1)
  if g_idx.shape != (d_in,):
    raise ValueError(f"g_idx {g_idx.shape} disagrees with d_in={d_in}.")
  return {"qweight": _pack_rows(codes, bits),
          "qzeros": _pack_cols(_ints(zeros, "zeros", 2**bits - 1), bits),
          "scales": s16, "g_idx": g_idx.astype(np.int32)}


def from_symmetric(codes_signed, scales, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """baq's symmetric grids in GPTQ terms: q = c + 2^(b-1), z = 2^(b-1).

  (q - z) * s == c * s. The restricted grid never uses GPTQ's code 0; the full
  grid (`gptq.GRIDS`, GPTQ's own) does. GPTQ
  stores s in float16, so the exported weight is c * fp16(s): for s in
  float16's normal range (>= 2^-14) |c * fp16(s) - c * s| <= |c| * 2^-11 * |s|,
  and <= |c| * 2^-25 below it (subnormal spacing 2^-24).

  Args:
    codes_signed: [d_in, d_out] integers in [-2^(b-1), 2^(b-1) - 1].
    scales: [n_groups, d_out] or [d_out] (per channel): only its shape is used.
    bits: 2, 3, 4 or 8.

  Returns:
    (codes, zeros) for `pack_layer`: int64 [d_in, d_out] and [n_groups, d_out].
  """
  half = 2 ** (_check_bits(bits) - 1)
  c = _ints(codes_signed, "symmetric codes", half - 1, -half)
  return c + half, np.full(np.atleast_2d(scales).shape, half, np.int64)


def _v1_offset(fmt: str) -> int:
  """What a stored zero field lacks: 1 in v1 ("gptq"), 0 in "gptq_v2"."""
  if fmt not in CHECKPOINT_FORMATS:
    raise ValueError(f"checkpoint_format {fmt!r} is not one of {CHECKPOINT_FORMATS}.")
  return int(fmt == "gptq")


def _encode_zeros(name: str, qzeros: np.ndarray, bits: int, fmt: str) -> np.ndarray:
  if not _v1_offset(fmt):
    return qzeros
  z = _unpack_cols(qzeros, bits)
  if z.min() == 0:
    raise ValueError(f"layer {name}: zero point 0 cannot be stored in checkpoint_format "
                     "'gptq' (v1 stores zero - 1); write 'gptq_v2'.")
  return _pack_cols(z - 1, bits)


def _check_packed(name: str, p: Mapping[str, np.ndarray], bits: int,
                  group_size: int) -> tuple[int, int, int]:
  """Validates one packed layer's shapes; returns (d_in, d_out, n_groups)."""
  missing = [f for f in _REQUIRED if f not in p]
  if missing:
    raise ValueError(f"layer {name} lacks {', '.join(missing)}.")
  qw = np.asarray(p["qweight"])
  d_out = qw.shape[1]
  d_in = len(p["g_idx"]) if "g_idx" in p else qw.shape[0] * WORD // bits
  g = d_in if group_size == -1 else group_size
  if qw.shape[0] != _words(d_in, bits):
    raise ValueError(f"layer {name}: qweight {qw.shape} does not hold d_in={d_in} rows of "
                     f"{bits}-bit codes (expected ({_words(d_in, bits)}, {d_out})); set its "
                     "bits through `dynamic`.")
  if g <= 0 or d_in % g:
    raise ValueError(f"layer {name}: group_size {group_size} does not divide d_in={d_in}.")
  n = d_in // g
  want = {"qzeros": (n, _words(d_out, bits)), "scales": (n, d_out), "bias": (d_out,)}
  for field, shape in want.items():
    if field in p and np.shape(p[field]) != shape:
      raise ValueError(f"layer {name}: {field} {np.shape(p[field])} disagrees with qweight "
                       f"{qw.shape} (expected {shape} at {bits} bits, group_size {group_size}).")
  if "g_idx" in p:
    _ints(p["g_idx"], f"layer {name}: g_idx", n - 1)
  return d_in, d_out, n


def unpack_layer(packed: Mapping[str, np.ndarray], bits: int, group_size: int,
                 checkpoint_format: str) -> np.ndarray:
  """Dequantizes one packed layer: float32 [d_in, d_out], groups taken from g_idx.

  Args:
    packed: {qweight, qzeros, scales[, g_idx]}, as stored or from `pack_layer`
      (whose qzeros are "gptq_v2").
    bits, group_size: the layer's own.
    checkpoint_format: "gptq" (qzeros hold zero - 1) or "gptq_v2".
  """
  d_in, d_out, _ = _check_packed("<unpack>", packed, _check_bits(bits), group_size)
  g = d_in if group_size == -1 else group_size
  g_idx = np.asarray(packed.get("g_idx", np.arange(d_in) // g), np.int64)
  q = _unpack_rows(packed["qweight"], bits, d_in)
  z = _unpack_cols(packed["qzeros"], bits, d_out) + _v1_offset(checkpoint_format)
  s = np.asarray(packed["scales"]).astype(np.float32)
  return (q - z[g_idx]).astype(np.float32) * s[g_idx]
