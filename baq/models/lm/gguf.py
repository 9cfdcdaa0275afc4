"""GGUF files (llama.cpp's format) into a baq `CausalLM`, or into a Hugging Face folder.

`load_gguf(path)` mirrors `hf.load(folder)`: it reads the file with the
`gguf` package's `GGUFReader`, builds the `DecoderConfig` from the
metadata of the file's architecture (`gguf_arch.GGUF_ARCHS`: llama, qwen2,
gpt2), renames the tensors to the family's HF state-dict names (undoing
llama.cpp's q/k row permutation and GPT-2's transposes) and runs the
family's own `to_params` and `hf.check_params`, so a GGUF model and its HF
checkpoint are one code path from there on. The tokenizer comes from the
file's metadata (`gguf_tokenizer`).

Tensor types: F32, F16, BF16 and F64 are read as they are (as float32);
block-quantized types (Q4_0, Q8_0, Q4_K, ...) are dequantized by
`gguf.quants.dequantize` into the float model they approximate. The head
is tied when output.weight is absent (llama.cpp then reads token_embd) or
equal to token_embd.weight, as llama2.c's exports store it.

    model, variables, tokenizer, family = load_gguf("stories260K.gguf")
    gguf_to_hf("stories260K.gguf", "/tmp/stories260K")  # hf.load reads it back
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from baq.models.lm import LM_FAMILIES
from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.models.lm.gguf_arch import GGUF_ARCHS, Meta, to_hf_state
from baq.models.lm.gguf_tokenizer import tokenizer_from_meta
from baq.models.lm.hf import CONFIG, TOKENIZER, WEIGHTS, add_quant_leaves, check_params
from baq.quant.inject import Quantizer

Q = gguf.GGMLQuantizationType
ARCH_KEY = gguf.Keys.General.ARCHITECTURE
_FLOAT = (Q.F32, Q.F16, Q.F64)  # the reader gives these as numpy floats


class Contents(NamedTuple):
  """A GGUF model as baq reads it.

  Attributes:
    arch: `general.architecture`.
    config: the `DecoderConfig` of its metadata.
    state_dict: the family's HF names -> float32 arrays (HF layouts).
    tokenizer: the `tokenizers.Tokenizer` of its metadata, or None.
    fields: every metadata key -> Python value.
  """

  arch: str
  config: DecoderConfig
  state_dict: dict[str, np.ndarray]
  tokenizer: Optional[Any]
  fields: dict[str, Any]


def tensor_array(tensor) -> np.ndarray:
  """A `GGUFReader` tensor as float32, [rows..., row] (numpy order, torch's layout).

  Args:
    tensor: a `gguf.ReaderTensor`.

  Returns:
    float32 array (a view of the file for F32).

  Raises:
    ValueError: a type baq cannot read as weights (integer tensors, or a
      quantized type `gguf.quants` cannot dequantize), naming tensor and type.
  """
  kind = Q(tensor.tensor_type)
  if kind in _FLOAT:
    return np.asarray(tensor.data, np.float32)
  if kind == Q.BF16:
    return tensor.data.view(np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
  if kind not in (Q.I8, Q.I16, Q.I32, Q.I64):
    try:
      return gguf.quants.dequantize(tensor.data, kind).astype(np.float32, copy=False)
    except NotImplementedError:
      pass
  raise ValueError(f"GGUF tensor {tensor.name!r} has type {kind.name}, which baq cannot read "
                   "as weights; readable: F32, F16, BF16, F64 and the block-quantized types "
                   "gguf.quants dequantizes.")


def read_fields(reader: gguf.GGUFReader) -> dict[str, Any]:
  """Every metadata key of the file (not the GGUF.* header) -> Python value."""
  return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def read(path: str) -> Contents:
  """Reads a GGUF model file into baq's terms (config, HF state dict, tokenizer).

  Args:
    path: the .gguf file.

  Returns:
    `Contents`.

  Raises:
    FileNotFoundError: no such file.
    KeyError: an architecture or tokenizer model baq does not read (the
      supported ones listed).
    ValueError: unsupported metadata, an unreadable tensor type, or tensors
      that do not fit the metadata (named).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  reader = gguf.GGUFReader(path)
  fields = read_fields(reader)
  arch_name = fields.get(ARCH_KEY)
  if arch_name not in GGUF_ARCHS.names():
    raise KeyError(f"Unsupported GGUF architecture {arch_name!r} in {path}. Supported "
                   f"architectures: {', '.join(GGUF_ARCHS.names())}.")
  arch = GGUF_ARCHS.get(arch_name)
  tensors = {t.name: tensor_array(t) for t in reader.tensors}
  embed, head = tensors.get("token_embd.weight"), tensors.get("output.weight")
  tied = head is None or (embed is not None and np.array_equal(head, embed))
  if tied:
    tensors.pop("output.weight", None)
  cfg = arch.config_from_meta(Meta(fields, arch_name), {k: v.shape for k, v in tensors.items()},
                              tied)
  arch.check(cfg)
  family = LM_FAMILIES.get(arch.family)
  state = to_hf_state(arch_name, family, cfg, tensors)
  return Contents(arch_name, cfg, state, tokenizer_from_meta(fields), fields)


def build(contents: Contents, quant: Optional[Quantizer] = None) -> tuple[CausalLM, dict, Any, str]:
  """The baq model of `read`'s contents: (model, variables, tokenizer or None, family name)."""
  name = GGUF_ARCHS.get(contents.arch).family
  params = LM_FAMILIES.get(name).to_params(contents.state_dict, contents.config)
  model = CausalLM(contents.config, quant)
  check_params(model, params)
  params = jax.tree.map(jnp.asarray, params)
  if quant is not None:
    params = add_quant_leaves(model, params)
  return model, {"params": params}, contents.tokenizer, name


def load_gguf(path: str, quant: Optional[Quantizer] = None) -> tuple[CausalLM, dict, Any, str]:
  """Reads a GGUF model file into a baq model (as `hf.load` reads a folder).

  Args:
    path: the .gguf file.
    quant: quantization factory, or None for the float model; its bit-width
      leaves start at their specs' init values.

  Returns:
    (model, variables {"params"}, tokenizer or None, family name).

  Raises:
    FileNotFoundError, KeyError, ValueError: see `read`.
  """
  return build(read(path), quant)


def hf_config(contents: Contents) -> dict:
  """The config.json of `read`'s contents, with the file's BOS/EOS/PAD ids."""
  keys = {"bos_token_id": gguf.Keys.Tokenizer.BOS_ID, "eos_token_id": gguf.Keys.Tokenizer.EOS_ID,
          "pad_token_id": gguf.Keys.Tokenizer.PAD_ID}
  fields, n = contents.fields, len(contents.fields.get(gguf.Keys.Tokenizer.LIST, ()))
  # llama.cpp writes -1 (as uint32) for "none".
  ids = {k: int(fields[v]) for k, v in keys.items() if v in fields and 0 <= fields[v] < n}
  return {**GGUF_ARCHS.get(contents.arch).hf_config(contents.config), **ids}


def gguf_to_hf(path: str, out_folder: str) -> str:
  """Writes a GGUF model as a Hugging Face folder that `hf.load` reads.

  Args:
    path: the .gguf file.
    out_folder: created if missing; config.json, model.safetensors (float32)
      and, when the file has a vocabulary, tokenizer.json are written there.

  Returns:
    `out_folder`.

  Raises:
    FileNotFoundError, KeyError, ValueError: see `read`.
  """
  contents = read(path)
  os.makedirs(out_folder, exist_ok=True)
  with open(os.path.join(out_folder, CONFIG), "w") as f:
    json.dump(hf_config(contents), f, indent=2)
  save_file({k: np.ascontiguousarray(v) for k, v in contents.state_dict.items()},
            os.path.join(out_folder, WEIGHTS), metadata={"format": "pt"})
  if contents.tokenizer is not None:
    contents.tokenizer.save(os.path.join(out_folder, TOKENIZER))
  return out_folder
