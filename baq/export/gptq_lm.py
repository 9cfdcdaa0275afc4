"""GPTQ checkpoints of language models quantized by `baq.ptq.decoder`, and back.

`export_gptq` turns `quantize_decoder`'s (params, records) into a GPTQ
folder (`baq.export.gptq_format`) under the checkpoint's own Hugging Face
names, for GPTQModel, AutoGPTQ and transformers; `load_gptq` reads a GPTQ
folder back into a baq `CausalLM` with dequantized float kernels, so an
exported model runs in baq again.

Conventions:
  * Modules are the family's `hf_modules(cfg)`: each HF quantizable module
    with the baq layers that are its columns. GPT-2's c_attn fuses q | k | v;
    the three share one input and one Hessian, and the scales are per output
    column (or per input group and column), so GPTQ of the fused kernel is
    GPTQ of the three and the module's codes and scales are their column
    concatenation, at the one bit-width all three must have.
  * Orientation: codes, qweight and the Flax kernel are all [d_in, d_out];
    the loader turns a dequantized weight into the family's HF layout, torch
    Linear's [out, in] or GPT-2 Conv1D's [in, out] (`LMFamily.hf_conv1d`).
  * Grid: baq's symmetric restricted grid, code c stored as q = c + 2^(b-1)
    with zero 2^(b-1) (`from_symmetric`), sym=True, desc_act=False. Scales
    are float16 in the file, so a weight reads back as c * fp16(s).
  * Codes: GPTQ records carry them; RTN records do not, and they are derived
    from the float kernel's absmax grid (`gptq_grid.grid`, the one `gptq.rtn`
    rounds to). Either way codes * scales must give the quantized kernel
    exactly. A module none of whose layers has a record stays float, and
    `dynamic` excludes it ("-:").
  * Bits: the config's `bits` is the most common module bit-width (ties: the
    first module's); other bit-widths, and a layer whose scales form one
    group where the config's group_size cannot, are `dynamic` overrides.
Refused, naming the module, its baq layers and shapes: codes that are
missing and cannot be derived, or that do not give the kernel; unequal bits,
or float and quantized layers, in one fused module; dimensions that are not
multiples of 32; bits GPTQ cannot pack; scales whose groups disagree with
group_size; records of layers no module holds; an hf_config that does not
describe `cfg` (the loader would build another model).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from baq.export.gptq_format import (ALLOWED_BITS, WORD, dynamic_overrides, from_symmetric,
                                    pack_layer, read_checkpoint, write_checkpoint)
from baq.models.lm import LM_FAMILIES, LMFamily, family_for_model_type, hf
from baq.models.lm.decoder import CausalLM
from baq.quant import gptq_grid

_PACKED = ("qweight", "qzeros", "scales", "g_idx")


def _get_family(family: Union[str, LMFamily]) -> LMFamily:
  fam = LM_FAMILIES.get(family) if isinstance(family, str) else family
  if fam.hf_modules is None:
    raise ValueError(f"LM family {family!r} registers no hf_modules, so its quantizable "
                     "modules have no Hugging Face names to export under.")
  return fam


def _check_config(fam: LMFamily, cfg: Any, hf_config: Mapping[str, Any]) -> None:
  if hf_config.get("model_type") not in fam.model_types:
    raise ValueError(f"hf_config's model_type {hf_config.get('model_type')!r} is not one of "
                     f"the family's {fam.model_types}.")
  got = fam.config_from_hf(dict(hf_config))
  diff = {f.name: (getattr(got, f.name), getattr(cfg, f.name))
          for f in dataclasses.fields(cfg) if getattr(got, f.name) != getattr(cfg, f.name)}
  if diff:
    raise ValueError(f"hf_config does not describe cfg (field: (hf_config's, cfg's)): {diff}; "
                     "the checkpoint would load as another model.")


def _rtn_scales(w: np.ndarray, bits: int, g: int) -> np.ndarray:
  """RTN's scales [n_groups, d_out]: the float kernel's absmax grid per g rows."""
  w32 = jnp.asarray(w, jnp.float32)
  return np.concatenate([np.asarray(gptq_grid.grid(w32[r:r + g], bits)[0])
                         for r in range(0, w.shape[0], g)])


def _layer(path: str, rec: Mapping[str, Any], kernel: np.ndarray, float_kernel: np.ndarray,
           group_size: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
  """One layer's (signed codes [d_in, d_out], scales [n_groups, d_out]), checked
  to give its quantized kernel exactly."""
  bits, (d_in, d_out) = int(rec["bits"]), kernel.shape
  g = group_size if group_size and group_size < d_in else d_in  # as gptq.gptq and gptq.rtn
  codes = rec.get("codes")
  if codes is not None:
    scales = np.atleast_2d(np.asarray(rec["scales"], np.float32))
  elif rec.get("method") == "rtn":
    scales = _rtn_scales(float_kernel, bits, g)
  else:
    raise ValueError(f"layer {path}: its record has no codes and method "
                     f"{rec.get('method')!r}; only round to nearest's can be derived.")
  n = -(-d_in // g)
  if scales.shape != (n, d_out):
    raise ValueError(f"layer {path}: scales {scales.shape} disagree with kernel {kernel.shape} "
                     f"at group_size={group_size} (expected ({n}, {d_out})).")
  rows = scales[np.arange(d_in) // g]
  codes = np.rint(np.asarray(kernel, np.float32) / rows) if codes is None else np.asarray(codes)
  qmax = 2 ** (bits - 1) - 1  # the full grid's codes reach -(qmax + 1)
  if (codes.shape != kernel.shape or codes.max() > qmax or codes.min() < -qmax - 1
      or not np.array_equal((codes.astype(np.float32) * rows).astype(kernel.dtype), kernel)):
    raise ValueError(f"layer {path}: codes x scales do not give its quantized kernel "
                     f"{kernel.shape} on the {bits}-bit grid (records of another run, or "
                     "another group_size?).")
  return codes.astype(np.int64), scales


def _module_group(name: str, d_in: int, group_size: Optional[int]) -> int:
  """The module's GPTQ group_size (-1: one group), refusing groups that do not tile d_in."""
  g = group_size or -1
  if g == -1 or g >= d_in:
    return g if g == d_in else -1
  if d_in % g:
    raise ValueError(f"module {name}: group_size {g} does not divide d_in={d_in}; GPTQ's "
                     "groups tile the input rows.")
  return g


def _module(name, paths, q, f, records, group_size):
  """One HF module's `pack_layer` dict (with bias), bits and group; None if float."""
  recs = {p: records.get(p) for p in paths}
  if all(r is None for r in recs.values()):
    changed = [p for p in paths if not np.array_equal(q[p]["kernel"], f[p]["kernel"])]
    if changed:
      raise ValueError(f"module {name}: layers {changed} have no record, so no codes, but "
                       "their kernels differ from the float model's.")
    return None
  if any(r is None for r in recs.values()):
    raise ValueError(f"module {name} fuses {list(paths)}, but only some are quantized "
                     f"({[p for p, r in recs.items() if r is not None]}); GPTQ stores one "
                     "module at one precision.")
  bits = {p: int(r["bits"]) for p, r in recs.items()}
  if len(set(bits.values())) > 1:
    raise ValueError(f"module {name} fuses {list(paths)}, which GPTQ quantizes as one module at "
                     f"one bit-width, but their bits differ: {bits}.")
  b = bits[paths[0]]
  shape = (q[paths[0]]["kernel"].shape[0], sum(q[p]["kernel"].shape[1] for p in paths))
  if shape[0] % WORD or shape[1] % WORD:
    raise ValueError(f"module {name} (layers {list(paths)}) has weight [d_in, d_out] = {shape}; "
                     f"GPTQ packs int32 words, so both must be multiples of {WORD}.")
  if b not in ALLOWED_BITS:
    raise ValueError(f"module {name} (layers {list(paths)}) has {b} bits; GPTQ packs "
                     f"{ALLOWED_BITS}.")
  g = _module_group(name, shape[0], group_size)
  parts = [_layer(p, recs[p], q[p]["kernel"], f[p]["kernel"], group_size) for p in paths]
  codes, scales = (np.concatenate(a, axis=1) for a in zip(*parts))
  unsigned, zeros = from_symmetric(codes, scales, b)
  packed = pack_layer(unsigned, scales, zeros, b, g)
  biases = [q[p].get("bias") for p in paths]
  if any(x is not None for x in biases):
    packed["bias"] = np.concatenate(biases)
  return packed, b, g


def _packed_modules(fam, cfg, float_params, quantized_params, records, group_size):
  """{HF module: (packed, bits, group)} of the quantized modules, and the float ones."""
  modules = fam.hf_modules(cfg)
  known = {p for paths in modules.values() for p in paths}
  unknown = sorted(k for k in records if not k.startswith("_") and k not in known)
  if unknown:
    raise ValueError(f"records name layers that no module of the family holds: {unknown[:8]}.")
  q, f = hf.modules(quantized_params), hf.modules(float_params)
  packed, floats = {}, []
  for name, paths in modules.items():
    m = _module(name, paths, q, f, records, group_size)
    if m is None:
      floats.append(name)
    else:
      packed[name] = m
  if not packed:
    raise ValueError("no layer has a record: there is nothing quantized to export.")
  return packed, floats


def _bits_config(packed: Mapping[str, tuple], floats: list[str], group_size: Optional[int]):
  """(default bits, default group_size, `dynamic`) of the modules."""
  bits = {name: b for name, (_, b, _) in packed.items()}
  default = collections.Counter(bits.values()).most_common(1)[0][0]
  default_g = group_size or -1
  dynamic = dynamic_overrides(bits, default, {n: g for n, (_, _, g) in packed.items()},
                              default_g)
  dynamic.update({"-:" + re.escape(name) + "$": {} for name in floats})
  return default, default_g, dynamic


def export_gptq(folder: str, family: Union[str, LMFamily], cfg: Any, float_params: Any,
                quantized_params: Any, records: Mapping[str, Mapping[str, Any]],
                hf_config: Mapping[str, Any], *, group_size: Optional[int] = None,
                checkpoint_format: str = "gptq", tokenizer: Any = None) -> dict[str, Any]:
  """Writes a GPTQ checkpoint folder of a language model GPTQ'd (or RTN'd) by baq.

  Args:
    folder: the folder to create (absent or empty); written atomically, and
      tokenizer.json added after.
    family: the `LM_FAMILIES` name (as `hf.load` returns it) or the family.
    cfg: the model's `DecoderConfig`.
    float_params: the params `quantize_decoder` started from (RTN's grid is
      taken from them; unrecorded layers must equal them).
    quantized_params, records: what `quantize_decoder` returned (same
      options.group_size as `group_size`).
    hf_config: the model's config.json dict (it must describe `cfg`); the
      written config.json adds its quantization_config.
    group_size: the quantization's group size; None for one scale per channel.
    checkpoint_format: "gptq" (v1 zero points, most hub checkpoints) or "gptq_v2".
    tokenizer: an optional `tokenizers.Tokenizer`, saved as tokenizer.json.

  Returns:
    The quantize_config record written.

  Raises:
    ValueError: see the module docstring.
    FileExistsError: `folder` exists and is not empty.
  """
  fam = _get_family(family)
  _check_config(fam, cfg, hf_config)
  packed, floats = _packed_modules(fam, cfg, float_params, quantized_params, records, group_size)
  tensors = dict(fam.from_params(quantized_params, cfg))
  for name in packed:
    tensors.pop(f"{name}.weight")
    tensors.pop(f"{name}.bias", None)  # the packed layer carries it
  bits, default_g, dynamic = _bits_config(packed, floats, group_size)
  tokenizer_json = tokenizer.to_str() if tokenizer is not None else None  # fails before writing
  qcfg = write_checkpoint(folder, {n: p for n, (p, _, _) in packed.items()}, tensors,
                          dict(hf_config), bits=bits, group_size=default_g, desc_act=False,
                          sym=True, checkpoint_format=checkpoint_format, dynamic=dynamic)
  if tokenizer_json is not None:
    with open(os.path.join(folder, hf.TOKENIZER), "w", encoding="utf-8") as fh:
      fh.write(tokenizer_json)
  return qcfg


def load_gptq(folder: str) -> tuple[CausalLM, dict, Any, str]:
  """Reads a GPTQ checkpoint folder into a float baq model with dequantized kernels.

  Any GPTQ folder of a supported family reads (asymmetric, act order, v1 or
  v2 zero points, per-module `dynamic`), not only baq's; the quantized
  modules' weights come from `read_checkpoint`, every other tensor as float.

  Args:
    folder: config.json, model.safetensors, and optionally quantize_config.json
      (else config.json's quantization_config) and tokenizer.json.

  Returns:
    (model, variables {"params"}, tokenizer or None, family name), as `hf.load`.

  Raises:
    FileNotFoundError: a file is missing (named).
    KeyError: an unsupported model_type, or a tensor the model needs is missing.
    ValueError: a malformed quantized layer, an unused tensor or a shape
      mismatch (named).
  """
  hf_config, state, tokenizer = hf.read_folder(folder)
  weights, _ = read_checkpoint(folder)
  name = family_for_model_type(hf_config.get("model_type"))
  fam = LM_FAMILIES.get(name)
  cfg = fam.config_from_hf(hf_config)
  conv1d = set(fam.hf_modules(cfg)) if fam.hf_conv1d and fam.hf_modules else set()
  for module, w in weights.items():
    for field in _PACKED:
      state.pop(f"{module}.{field}", None)
    state[f"{module}.weight"] = w if module in conv1d else np.ascontiguousarray(w.T)
  params = fam.to_params(state, cfg)
  model = CausalLM(cfg)
  hf.check_params(model, params)
  return model, {"params": jax.tree.map(jnp.asarray, params)}, tokenizer, name
