"""llama.cpp's GGUF weight formats as baq numerics: the codec and the weight-only matmul.

Ten ggml types, named as llama-quantize names them in lower case:

  type   block  bits/weight   type   block  bits/weight
  q8_0     32   8.5           q6_k    256   6.5625
  q5_1     32   6.0           q5_k    256   5.5
  q5_0     32   5.5           q4_k    256   4.5
  q4_1     32   5.0           q3_k    256   3.4375
  q4_0     32   4.5           q2_k    256   2.625

ggml quantizes along the rows of the torch/ggml weight [d_out, d_in], so
each output channel's d_in weights are cut into blocks: along d_in of a
Flax kernel [d_in, d_out]. A row whose length does not divide into the
block takes llama.cpp's fallback (src/llama-quant.cpp
`tensor_type_fallback`, applied even with --pure): q6_k -> q8_0,
q5_k -> q5_1, q4_k -> q5_0, q3_k and q2_k -> q4_0, and any type whose rows
do not divide into 32 stays F16 (`stored_type`).

The codec is numpy (`quantize`, `dequantize`: uint8 blocks in ggml's exact
layout); the numerics run the same arithmetic in jax.numpy. They are
weight-only: `dot` is x @ dequant(quant(w)) in float32, the dequantized-weight
semantics. llama.cpp's CPU matmul instead quantizes the activations to Q8
for its integer dot products; baq does not model that.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from baq.quant.numerics import ggml_kquants, ggml_legacy
from baq.quant.numerics._common import _F16, _F32, _kernel, _matmul, _ste


class GgmlType(NamedTuple):
  """One ggml block format: sizes, and its codec as functions of (xp, ...) and bytes."""
  block: int  # weights per block
  type_size: int  # bytes per block
  code_bits: int  # bits of one weight's code
  codes: object  # (xp, float32 [N, block]) -> fields
  dequant: object  # (xp, fields) -> float32 [N, block]
  pack: object  # fields -> uint8 [N, type_size]
  unpack: object  # uint8 [N, type_size] -> fields


_SIZES = {"q8_0": 34, "q5_1": 24, "q5_0": 22, "q4_1": 20, "q4_0": 18,
          "q6_k": 210, "q5_k": 176, "q4_k": 144, "q3_k": 110, "q2_k": 84}
TYPES = {
    **{n: GgmlType(ggml_legacy.QK, _SIZES[n], bits, codes, dq,
                   functools.partial(ggml_legacy.pack, n), functools.partial(ggml_legacy.unpack, n))
       for n, (codes, dq, _, bits) in ggml_legacy.LEGACY.items()},
    **{n: GgmlType(ggml_kquants.QK_K, _SIZES[n], bits, codes, dq,
                   functools.partial(ggml_kquants.pack, n),
                   functools.partial(ggml_kquants.unpack, n))
       for n, (codes, dq, bits) in ggml_kquants.KQUANTS.items()},
}
# src/llama-quant.cpp tensor_type_fallback: a 256-block type on rows that do not divide.
FALLBACK = {"q6_k": "q8_0", "q5_k": "q5_1", "q4_k": "q5_0", "q3_k": "q4_0", "q2_k": "q4_0"}


def _type(qtype: str) -> GgmlType:
  if qtype not in TYPES:
    raise ValueError(f"qtype={qtype!r} is not one of {', '.join(TYPES)}.")
  return TYPES[qtype]


def bits_per_weight(qtype: str) -> float:
  """All the bits a block of `qtype` holds, per weight (q4_k: 4.5)."""
  t = _type(qtype)
  return 8.0 * t.type_size / t.block


def stored_type(qtype: str, d_in: int) -> str:
  """The type llama.cpp stores a weight of rows of d_in in, asked for `qtype`.

  Args:
    qtype: one of TYPES.
    d_in: the row length (a Flax kernel's d_in).

  Returns:
    qtype if d_in divides into its block; else its FALLBACK if d_in divides
    into that one's block; else "f16" (the weight stays float16).
  """
  for t in (qtype, FALLBACK.get(qtype)):
    if t is not None and d_in % _type(t).block == 0:
      return t
  return "f16"


def _blocks(rows, qtype: str) -> np.ndarray:
  t = _type(qtype)
  rows = np.asarray(rows, np.float32)
  if rows.ndim != 2 or rows.shape[1] % t.block:
    raise ValueError(f"rows must be [n, k] with k a multiple of {qtype}'s block of {t.block}, "
                     f"got shape {rows.shape}.")
  return rows.reshape(-1, t.block)


def quantize(rows, qtype: str) -> np.ndarray:
  """rows as ggml stores them in `qtype` (the C reference, no importance matrix).

  Args:
    rows: float32 [n, k], k a multiple of the type's block.
    qtype: one of TYPES.

  Returns:
    uint8 [n, k / block * type_size]: the blocks of each row, in ggml's
    layout (gguf.quants.quantize's shape).
  """
  blocks = _blocks(rows, qtype)
  t = _type(qtype)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    out = t.pack(t.codes(np, blocks))
  return out.reshape(np.shape(rows)[0], -1)


def dequantize(data, qtype: str) -> np.ndarray:
  """ggml's dequantize_row_* of uint8 [n, bytes] blocks: float32 [n, k]."""
  t = _type(qtype)
  data = np.asarray(data, np.uint8)
  if data.ndim != 2 or data.shape[1] % t.type_size:
    raise ValueError(f"data must be uint8 [n, bytes] with bytes a multiple of {qtype}'s "
                     f"{t.type_size}, got shape {data.shape}.")
  out = t.dequant(np, t.unpack(data.reshape(-1, t.type_size)))
  return out.astype(np.float32).reshape(data.shape[0], -1)


@functools.partial(jax.jit, static_argnums=0)
def _dequantized(qtype: str, rows: jax.Array) -> jax.Array:
  """rows [n, k] through quantize and dequantize, in jax.numpy (`stored_type` applied)."""
  stored = stored_type(qtype, rows.shape[1])
  if stored == "f16":
    return rows.astype(_F16).astype(_F32)
  t, xp = TYPES[stored], jnp
  return t.dequant(xp, t.codes(xp, rows.reshape(-1, t.block))).reshape(rows.shape)


def _ggml_weight(qtype: str, w: jax.Array) -> jax.Array:
  """The kernel as llama.cpp stores it in `qtype`, dequantized (shape and dtype of w)."""
  w = _kernel(w)
  # The codes are a search: no gradient flows through them (ste=True gives the float one).
  return _dequantized(qtype, lax.stop_gradient(w).T.astype(_F32)).T.astype(w.dtype)


def _ggml_storage(qtype: str, d_in: int, d_out: int) -> tuple[float, float]:
  """What the GGUF file holds for a [d_in, d_out] kernel.

  Returns:
    (bits per weight code, bits of the block scales and minimums) of the
    type the weight is stored in (`stored_type`): q4_k on rows of 4096:
    (4, 0.5 x d_in x d_out); on rows of 32 x odd, its fallback q5_0's;
    on rows not divisible by 32, (16, 0): F16.
  """
  stored = stored_type(qtype, d_in)
  if stored == "f16":
    return 16.0, 0.0
  t = TYPES[stored]
  return float(t.code_bits), float((8 * t.type_size - t.code_bits * t.block) *
                                   (d_in // t.block) * d_out)


def _ggml_dot(qtype: str, x, w, *, ste: bool = False) -> jax.Array:
  """x @ dequant(quant(w)) in float32 (x [..., d_in], w [d_in, d_out]), as x.dtype."""
  wq = _ggml_weight(qtype, w.astype(_F32))
  y = _matmul(x.astype(_F32), wq).astype(x.dtype)
  return _ste(x, w, y, ste)
