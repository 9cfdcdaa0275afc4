"""A baq causal LM as a GGUF file (llama.cpp's format), written with the `gguf` package.

`write_gguf` turns the params into the family's Hugging Face state dict
(`from_params`), renames and re-lays the tensors as llama.cpp's
convert_hf_to_gguf.py does (`baq.models.lm.gguf_arch`: the gguf package's
name table, q/k rows permuted for the "llama" architecture's rotary
convention, GPT-2's Conv1D weights transposed), and writes them with
`gguf.GGUFWriter` beside the architecture's metadata and the tokenizer's
(`baq.models.lm.gguf_tokenizer`). `baq.models.lm.gguf.load_gguf` reads the
file back to the same params.

Types: every matrix is written as `dtype` ("f32" or "f16"); vectors (norms,
biases) stay F32, as llama.cpp's converter keeps them. `overrides` puts
other bytes in place of a tensor: {GGUF name: (uint8 array of the blocks,
gguf.GGMLQuantizationType)}, e.g. quantized blocks baq made; the bytes must
be exactly the type's blocks for the tensor's shape. Everything is checked
before the file is opened (a type that cannot hold a tensor, values beyond
F16's range, an unknown tensor name), and the file is written under a
temporary name and moved into place, so a refused export leaves nothing.

    write_gguf("/tmp/model.gguf", model.config, params, "llama", tokenizer)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import gguf
import numpy as np

from baq.data.text.tokenizer import special_ids
from baq.models.lm import LM_FAMILIES
from baq.models.lm.gguf_arch import GGUF_ARCHS, to_gguf_tensors
from baq.models.lm.gguf_tokenizer import meta_from_tokenizer

Q = gguf.GGMLQuantizationType
DTYPES = {"f32": (Q.F32, np.float32, gguf.LlamaFileType.ALL_F32),
          "f16": (Q.F16, np.float16, gguf.LlamaFileType.MOSTLY_F16)}
F16_MAX = float(np.finfo(np.float16).max)


def _planned(tensors: Mapping[str, np.ndarray], dtype: str,
             overrides: Mapping[str, tuple[np.ndarray, Any]]) -> dict[str, tuple]:
  """GGUF name -> (array to write, raw ggml type or None), every tensor checked.

  Raises:
    ValueError: an override of an unknown tensor, of a type that cannot hold
      the tensor's shape, or of the wrong byte count; an F16 matrix with
      values beyond F16's range (each named).
  """
  unknown = sorted(set(overrides) - set(tensors))
  if unknown:
    raise ValueError(f"GGUF overrides name tensors the model does not have: {unknown[:8]}; "
                     f"its tensors: {', '.join(list(tensors)[:8])}, ...")
  _, np_type, _ = DTYPES[dtype]
  plan = {}
  for name, value in tensors.items():
    if name in overrides:
      raw, kind = overrides[name]
      kind = Q(kind)
      block, type_size = gguf.GGML_QUANT_SIZES[kind]
      if value.shape[-1] % block:
        raise ValueError(f"GGUF type {kind.name} cannot hold tensor {name!r} of shape "
                         f"{value.shape}: its rows of {value.shape[-1]} are not a multiple of "
                         f"the {block}-value block.")
      want = (*value.shape[:-1], value.shape[-1] // block * type_size)
      raw = np.asarray(raw)
      if raw.dtype != np.uint8 or raw.size != int(np.prod(want)):
        raise ValueError(f"GGUF override of {name!r} as {kind.name} must be {int(np.prod(want))} "
                         f"uint8 bytes (shape {want}), got {raw.dtype} of size {raw.size}.")
      plan[name] = (raw.reshape(want), kind)
    elif value.ndim == 1:
      plan[name] = (np.ascontiguousarray(value, np.float32), None)
    else:
      if np_type == np.float16 and np.max(np.abs(value), initial=0.0) > F16_MAX:
        raise ValueError(f"GGUF dtype 'f16' cannot hold tensor {name!r}: its largest magnitude "
                         f"{float(np.max(np.abs(value))):.4g} exceeds F16's {F16_MAX:.0f}.")
      plan[name] = (np.ascontiguousarray(value, np_type), None)
  return plan


def _write_meta(writer: gguf.GGUFWriter, fields: Mapping[str, Any]) -> None:
  """Adds {key: value} by the value's Python type (bool, int as uint32, float, str, list)."""
  for key, value in fields.items():
    if isinstance(value, bool):
      writer.add_bool(key, value)
    elif isinstance(value, int):
      writer.add_uint32(key, value)
    elif isinstance(value, float):
      writer.add_float32(key, value)
    elif isinstance(value, str):
      writer.add_string(key, value)
    else:
      writer.add_array(key, list(value))


def write_gguf(path: str, cfg, params: Mapping[str, Any], family: str,
               tokenizer: Optional[Any] = None, *, arch: Optional[str] = None,
               dtype: str = "f32",
               overrides: Optional[Mapping[str, tuple[np.ndarray, Any]]] = None,
               special: Optional[Mapping[str, Optional[int]]] = None,
               name: str = "baq") -> str:
  """Writes a baq causal LM as a GGUF file.

  Args:
    path: the .gguf file to write (replaced if present).
    cfg: the model's `DecoderConfig`.
    params: its float params (quantizer leaves are ignored).
    family: its `LM_FAMILIES` name ("llama", "gpt2").
    tokenizer: a `tokenizers.Tokenizer` (BPE with byte fallback, or
      byte-level BPE), or None for a file without a vocabulary (llama.cpp
      needs one to run it).
    arch: the GGUF architecture (`GGUF_ARCHS`); None: the one named like
      the family ("qwen2" must be asked for).
    dtype: "f32" or "f16", the type of every matrix not overridden.
    overrides: GGUF tensor name -> (uint8 bytes, GGMLQuantizationType) to
      write instead of that tensor.
    special: {"bos", "eos", "unk", "pad"} -> id; None: the tokenizer's
      usual names (`baq.data.text.tokenizer.special_ids`).
    name: `general.name`.

  Returns:
    `path`.

  Raises:
    KeyError: an unknown family or architecture (the valid ones listed).
    ValueError: an unknown dtype, a model the architecture cannot hold, an
      architecture of another family, or a tensor its type cannot hold
      (named); nothing is written then.
  """
  if dtype not in DTYPES:
    raise ValueError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
  fam = LM_FAMILIES.get(family)
  arch_name = arch or family
  spec = GGUF_ARCHS.get(arch_name)
  if spec.family != family:
    raise ValueError(f"GGUF architecture {arch_name!r} holds {spec.family} models, not {family}; "
                     f"architectures of {family}: "
                     f"{[a for a in GGUF_ARCHS.names() if GGUF_ARCHS.get(a).family == family]}.")
  spec.check(cfg)
  tensors = to_gguf_tensors(arch_name, fam, cfg, fam.from_params(params, cfg))
  plan = _planned(tensors, dtype, overrides or {})
  tok_meta = {}
  if tokenizer is not None:
    if tokenizer.get_vocab_size() != cfg.vocab_size:
      raise ValueError(f"The tokenizer has {tokenizer.get_vocab_size()} tokens, the model "
                       f"vocab_size={cfg.vocab_size}; GGUF needs them equal.")
    tok_meta = meta_from_tokenizer(tokenizer, special_ids(tokenizer) if special is None
                                   else special)

  tmp = path + ".tmp"
  writer = gguf.GGUFWriter(tmp, arch_name)
  try:
    writer.add_name(name)
    writer.add_file_type(DTYPES[dtype][2])
    spec.write_meta(writer, cfg)
    _write_meta(writer, tok_meta)
    for tensor_name, (value, raw_type) in plan.items():
      writer.add_tensor(tensor_name, value, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
  finally:
    writer.close()
  os.replace(tmp, path)
  return path
