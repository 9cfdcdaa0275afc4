"""A baq-quantized language model as a block-quantized GGUF file, for llama.cpp.

`export_gguf` takes what `baq.ptq.decoder.quantize_decoder` returns (the
params with quantized kernels, and per layer its bits, integer codes and
scales) and writes each quantized projection as ggml blocks, each tensor in
its own type (a mixed allocation gives one per tensor), through
`baq.export.gguf_lm.write_gguf`.

Exact where baq's grid is a ggml grid. baq's grid is w = c x s (symmetric
codes c, one scale s per output channel or per group of input rows); a
ggml block is 32 weights along a row (d_in) with an fp16 scale d. When s is
constant over each block (per channel, or groups that are multiples of 32)
and fp16-exact, and c fits the type, the codes are written as they are:
  q4_0   stored q = c + 8 in [0, 15], d = s       (baq's 2-4 bits)
  q5_0   stored q = c + 16 in [0, 31], d = s      (5 bits)
  q8_0   q = c in [-128, 127], d = s              (6-8 bits; the default by bits
                                                   is `BIT_TYPES`)
  q4_1 / q5_1   w = d q + m with q = c + z (z the record's zero point, or
                half the range for a symmetric grid), m = -z s fp16-exact.
baq's scales are float32 unless the quantizer rounds them to float16
(`gptq.gptq(..., scale_dtype="float16")`, the study's `quant.scale_dtype`),
which the GGUF export should use. Exactness is not assumed: every tensor is
dequantized by the `gguf` package (`gguf.quants.dequantize`, llama.cpp's own
Python codec) and compared with baq's weight; "exact" means equal float32
bits, a zero's sign aside.

Otherwise (k-quants such as q2_k / q3_k, float32 scales, groups that cut a
block) baq's dequantized weight is re-quantized with llama.cpp's codec
(`baq.quant.numerics.ggml.quantize`, byte-identical to it) and the record
gives the change. A row that does not divide into the type's block takes
llama.cpp's fallback (`ggml.stored_type`: q2_k/q3_k -> q4_0, ..., and F16
for rows not of 32s, as stories260K's ffn_down with 172 inputs). With
strict=True any tensor not held exactly in the type asked for is refused.
Every check runs before the file is opened; a refused export writes nothing.

    rec = export_gguf("/tmp/q.gguf", "llama", cfg, qparams, records, tokenizer)
    rec["tensors"]["blk.0.attn_q.weight"]  # type, exact, max_abs_diff, ...
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

import flax
import flax.traverse_util as tu
import gguf
import numpy as np

from baq.export.gguf_lm import F16_MAX, write_gguf
from baq.models.lm import LM_FAMILIES
from baq.models.lm.gguf_arch import to_gguf_tensors
from baq.quant.numerics import ggml

# baq bit-width -> the ggml type that holds its symmetric codes exactly.
BIT_TYPES = {2: "q4_0", 3: "q4_0", 4: "q4_0", 5: "q5_0", 6: "q8_0", 7: "q8_0", 8: "q8_0"}
# The scale dtype a quantizer must use for the export to be exact.
SCALE_DTYPE = "float16"
# ggml type -> (offset added to a signed code, lowest and highest stored code)
_SIGNED = {"q4_0": (8, 0, 15), "q5_0": (16, 0, 31), "q8_0": (0, -128, 127)}
_AFFINE = {"q4_1": 15, "q5_1": 31}  # w = d q + m, q in [0, top]
_F16, _F32 = np.float16, np.float32
# A row no block type divides: "f16" as llama.cpp keeps it, or "f32" (exact).
FALLBACKS = {"f16": _F16, "f32": _F32}


def _qtype(name: str) -> gguf.GGMLQuantizationType:
  return gguf.GGMLQuantizationType[name.upper()]


def _check_type(t: str, where: str) -> str:
  if t not in ggml.TYPES:
    raise ValueError(f"{where}: ggml type {t!r} is not one of {', '.join(ggml.TYPES)}.")
  return t


def _layer_arrays(name: str, rec: Mapping[str, Any], kernel, group_size: Optional[int]):
  """(signed codes, scales, zero points or NaN) per element of one layer's kernel,
  checked to give the kernel; codes NaN where the record has none."""
  kernel = np.asarray(kernel)
  d_in, d_out = kernel.shape
  if rec.get("codes") is None or rec.get("scales") is None:
    nan = np.full(kernel.shape, np.nan, _F32)
    return nan, nan, nan
  g = group_size if group_size and group_size < d_in else d_in
  scales = np.atleast_2d(np.asarray(rec["scales"], _F32))
  if scales.shape != (-(-d_in // g), d_out):
    raise ValueError(f"layer {name}: scales {scales.shape} disagree with kernel {kernel.shape} "
                     f"at group_size={group_size}.")
  rows = np.arange(d_in) // g
  s = scales[rows]
  z = (np.atleast_2d(np.asarray(rec["zeros"], _F32))[rows] if rec.get("zeros") is not None
       else np.full(kernel.shape, np.nan, _F32))
  c = np.asarray(rec["codes"], _F32) - np.nan_to_num(z)
  if c.shape != kernel.shape or not np.array_equal((c * s).astype(kernel.dtype), kernel):
    raise ValueError(f"layer {name}: codes x scales do not give its quantized kernel "
                     f"{kernel.shape} (records of another run, or another group_size?).")
  return c, s, z


def _layouts(arch: str, family, cfg, params, records, group_size) -> dict[str, dict]:
  """GGUF name -> {w, idx, c, s, z} in GGUF layout, for tensors holding recorded layers.

  The layers' codes, scales and indices (1 + position in `layers`, 0: float)
  go through the same `from_params` and `to_gguf_tensors` as the weights, so
  fused modules, transposes and llama's q/k row permutation move them alike.
  """
  flat = tu.flatten_dict(flax.core.unfreeze(params), sep="/")
  layers = [k for k in records if not k.startswith("_")]
  unknown = [k for k in layers if f"{k}/kernel" not in flat]
  if unknown:
    raise ValueError(f"records name layers the params do not have: {unknown[:8]}.")
  parts = {k: _layer_arrays(k, records[k], flat[f"{k}/kernel"], group_size) for k in layers}

  def layout(fill):
    tree = {k: np.zeros(np.shape(v), _F32) for k, v in flat.items()}
    tree.update({f"{k}/kernel": fill(i, k) for i, k in enumerate(layers)})
    return to_gguf_tensors(arch, family, cfg,
                           family.from_params(tu.unflatten_dict(tree, sep="/"), cfg))

  idx = layout(lambda i, k: np.full(parts[k][0].shape, i + 1, _F32))
  w = to_gguf_tensors(arch, family, cfg, family.from_params(params, cfg))
  fields = [layout(lambda i, k, j=j: parts[k][j]) for j in range(3)]
  out = {}
  for name, ids in idx.items():
    if ids.ndim == 2 and ids.max() > 0:
      out[name] = dict(w=np.asarray(w[name], _F32), idx=ids,
                       c=np.where(ids > 0, fields[0][name], np.nan),  # float rows: no codes
                       s=fields[1][name], z=fields[2][name],
                       layers=[layers[int(i) - 1] for i in np.unique(ids) if i > 0])
  return out


def _from_codes(qtype: str, c, s, z) -> tuple[Optional[dict], str]:
  """The type's block fields of codes c and scales s, and why they are not exact.

  Returns:
    (fields, "") holding c x s exactly; (fields, why) with scales (and
    minimums) rounded to float16, the codes kept; (None, why) when the codes
    do not fit the type, so that the weight must be re-quantized.
  """
  blk = lambda a: a.reshape(-1, ggml.TYPES[qtype].block)
  c, s, z = blk(c), blk(s), blk(z)
  if np.isnan(c).any():
    return None, "a layer's record has no codes"
  if qtype not in _SIGNED and qtype not in _AFFINE:
    return None, f"{qtype} is not one scale per 32 codes; baq's grid is re-quantized"
  if np.any(s != s[:, :1]):
    return None, "scales change within a 32-value block (group size not a multiple of 32)"
  d, note = s[:, 0], ""
  if np.any(d.astype(_F16).astype(_F32) != d):
    note = (f"scales are not float16-exact (quantize with scale_dtype={SCALE_DTYPE!r}): "
            "the codes are kept, the scales rounded to float16")
  if qtype in _SIGNED:
    off, lo, hi = _SIGNED[qtype]
    q, m = c + off, None
  else:
    lo, hi = 0, _AFFINE[qtype]
    zero = np.where(np.isnan(z), (hi + 1) // 2, z)  # a symmetric grid: half the range
    if np.any(zero != zero[:, :1]):
      return None, "zero points change within a 32-value block"
    q, m = c + zero, -zero[:, 0] * d
    if np.any(m.astype(_F16).astype(_F32) != m) and not note:
      note = "the minimums -zero x scale are not float16-exact: rounded to float16"
  if q.min() < lo or q.max() > hi:
    return None, f"codes span [{c.min():.0f}, {c.max():.0f}], beyond {qtype}'s range"
  fields = {"d": d.astype(_F16), "q": q.astype(np.int32)}
  if m is not None:
    fields["m"] = m.astype(_F16)
  return fields, note


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  """Equal float32 bits, a zero's sign aside (+0.0 turns -0.0 into +0.0)."""
  return np.array_equal((a.astype(_F32) + _F32(0)).view(np.uint32),
                        (b.astype(_F32) + _F32(0)).view(np.uint32))


def _tensor(name: str, t: dict, qtype: str, fallback: str) -> tuple[np.ndarray, str, dict]:
  """(uint8 bytes, stored type, record) of one quantized tensor."""
  w = t["w"]
  stored = ggml.stored_type(qtype, w.shape[-1])
  stored = fallback if stored == "f16" else stored
  reason = "" if stored == qtype else (
      f"rows of {w.shape[-1]} do not divide into {qtype}'s {ggml.TYPES[qtype].block}-value "
      f"blocks: stored as {stored} (llama.cpp's fallback)")
  if stored in FALLBACKS:
    if stored == "f16" and np.abs(w).max() > F16_MAX:
      raise ValueError(f"GGUF tensor {name!r} falls back to F16, which cannot hold its "
                       f"largest magnitude {float(np.abs(w).max()):.4g}.")
    back = w.astype(FALLBACKS[stored]).astype(_F32)
    raw, how = np.ascontiguousarray(w.astype(FALLBACKS[stored])).view(np.uint8), stored
  else:
    fields, why = _from_codes(stored, t["c"], t["s"], t["z"])
    if fields is not None:
      raw, how = ggml.TYPES[stored].pack(fields).reshape(w.shape[0], -1), "codes"
    else:
      raw, how = ggml.quantize(w, stored), "requantized"
    reason = "; ".join(r for r in (reason, why) if r)
    back = gguf.quants.dequantize(raw, _qtype(stored)).astype(_F32)  # the real library
  diff = np.abs(back - w)
  rec = dict(requested=qtype, type=stored, path=how, exact=_same(back, w),
             max_abs_diff=float(diff.max()),
             rel_error=float(np.linalg.norm(back - w) / max(np.linalg.norm(w), 1e-30)),
             layers=t["layers"], bits=t["bits"], reason=reason)
  return raw, stored, rec


def _requested(name: str, bits: int, bit_types, tensor_types) -> str:
  for pattern, t in tensor_types.items():
    if re.fullmatch(pattern, name):
      return t
  if bits not in bit_types:
    raise ValueError(f"GGUF tensor {name!r} holds {bits}-bit layers and bit_types maps only "
                     f"{sorted(bit_types)}.")
  return bit_types[bits]


def export_gguf(path: str, family: str, cfg, quantized_params: Any,
                records: Mapping[str, Mapping[str, Any]], tokenizer: Any = None, *,
                group_size: Optional[int] = None, bit_types: Optional[Mapping[int, str]] = None,
                tensor_types: Optional[Mapping[str, str]] = None, strict: bool = False,
                fallback: str = "f16",
                arch: Optional[str] = None, dtype: str = "f32",
                special: Optional[Mapping[str, Optional[int]]] = None,
                verbose: bool = True) -> dict[str, Any]:
  """Writes a model quantized by `quantize_decoder` as a block-quantized GGUF file.

  Args:
    path: the .gguf file (its folder is made; written atomically).
    family: the `LM_FAMILIES` name.
    cfg: the model's `DecoderConfig`.
    quantized_params: the params `quantize_decoder` returned.
    records: its per-layer records (bits, codes, scales; optional zeros for
      an asymmetric grid w = (codes - zeros) x scales).
    tokenizer: a `tokenizers.Tokenizer` for the file's vocabulary, or None.
    group_size: the quantization's group size (None: per output channel).
    bit_types: bits -> ggml type, merged over `BIT_TYPES` ({2: "q2_k"}).
    tensor_types: GGUF name regex (re.fullmatch) -> ggml type, before
      bit_types (as llama-quantize's --tensor-type).
    strict: refuse unless every quantized tensor is stored exactly in the
      type asked for.
    fallback: the type of rows no block divides: "f16" (llama.cpp's) or
      "f32" (exact).
    arch, dtype, special: as `write_gguf` (dtype: the float tensors' type).
    verbose: print one line per tensor stored otherwise than asked, or not exactly.

  Returns:
    {"path", "exact" (every tensor), "tensors": GGUF name -> {requested, type,
    path ("codes", "requantized", "f16" or "f32"), exact, max_abs_diff, rel_error
    (Frobenius, relative to baq's weight), layers, bits, reason}}.

  Raises:
    ValueError: an unknown ggml type, bits without a type, records that do
      not give the kernels, or (strict) a tensor not held exactly; nothing
      is written then.
  """
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}.")
  bit_types = {**BIT_TYPES, **(bit_types or {})}
  tensor_types = dict(tensor_types or {})
  for where, table in (("bit_types", bit_types), ("tensor_types", tensor_types)):
    for key, t in table.items():
      _check_type(t, f"{where}[{key!r}]")
  fam = LM_FAMILIES.get(family)
  tensors = _layouts(arch or family, fam, cfg, quantized_params, records, group_size)
  if not tensors:
    raise ValueError("no layer has a record: there is nothing quantized to export.")
  overrides, report = {}, {}
  for name, t in tensors.items():
    t["bits"] = max(int(records[k]["bits"]) for k in t["layers"])
    raw, stored, report[name] = _tensor(name, t, _requested(name, t["bits"], bit_types,
                                                            tensor_types), fallback)
    overrides[name] = (raw, _qtype(stored))
  bad = {n: r for n, r in report.items() if not r["exact"] or r["type"] != r["requested"]}
  if strict and bad:
    raise ValueError("strict GGUF export refused; tensors not held exactly in the type asked "
                     "for: " + "; ".join(f"{n} ({r['requested']} -> {r['type']}, max |diff| "
                                         f"{r['max_abs_diff']:.3g}: {r['reason'] or 'inexact'})"
                                         for n, r in list(bad.items())[:8]))
  folder = os.path.dirname(os.path.abspath(path))
  made = not os.path.isdir(folder)
  os.makedirs(folder, exist_ok=True)
  try:
    write_gguf(path, cfg, quantized_params, family, tokenizer, arch=arch, dtype=dtype,
               overrides=overrides, special=special)
  except Exception:
    if made and not os.listdir(folder):
      os.rmdir(folder)
    raise
  if verbose:
    for n, r in bad.items():
      print(f"[gguf] {n}: {r['requested']} stored as {r['type']} ({r['path']}), "
            f"exact {r['exact']}, max |diff| {r['max_abs_diff']:.3g}, relative error "
            f"{r['rel_error']:.3g}: {r['reason'] or 'inexact'}", flush=True)
  return dict(path=path, exact=all(r["exact"] for r in report.values()), tensors=report)
