"""The GGUF architectures baq reads and writes: metadata, tensor names and layouts.

A GGUF file names its architecture (`general.architecture`), keeps the
shape of the model as `{arch}.*` metadata and its tensors under llama.cpp's
names ("blk.0.attn_q.weight"). An entry of `GGUF_ARCHS` is what baq knows of
one architecture: the baq family whose converters serve it, the metadata
read into a `DecoderConfig` and written back, the config.json that
`gguf_to_hf` writes for it, and whether llama.cpp's rotary convention
permutes its q/k rows.

Tensor names are not tabled here: the family's `from_params` gives the
Hugging Face state-dict names, and the `gguf` package's own
`get_tensor_name_map` (the table llama.cpp's convert_hf_to_gguf.py uses)
maps them to GGUF names, so a GGUF tensor is an HF tensor under another name
and, two layouts aside, the same array (numpy [out, in], torch's order):

* llama.cpp's "llama" architecture rotates adjacent pairs (GPT-J style),
  while HF Llama's rotate_half pairs the two halves of a head, so
  convert_hf_to_gguf.py permutes the rows of q and k (`permute_rows`);
  reading undoes it (`unpermute_rows`). Qwen2 runs NeoX rotary in
  llama.cpp, HF's own layout, and is not permuted.
* GPT-2's Conv1D weights are [in, out] in HF and transposed in GGUF.

    arch = GGUF_ARCHS.get("llama")
    cfg = arch.config_from_meta(Meta(fields, "llama"), shapes, tied=True)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from baq.models.lm import LMFamily
from baq.models.lm.config import DecoderConfig
from baq.models.lm.decoder import CausalLM
from baq.registry import Registry

K = gguf.Keys
_REQUIRED = object()


class Meta:
  """A GGUF file's metadata, read by `gguf.Keys` templates ("{arch}.context_length").

  Args:
    fields: key -> Python value (strings, numbers, lists).
    arch: the architecture name the templates are formatted with.
  """

  def __init__(self, fields: Mapping[str, Any], arch: str):
    self.fields, self.arch = dict(fields), arch

  def __call__(self, template: str, default: Any = _REQUIRED) -> Any:
    key = template.format(arch=self.arch)
    if key in self.fields:
      return self.fields[key]
    if default is _REQUIRED:
      raise ValueError(f"GGUF metadata {key!r} is missing (architecture {self.arch!r}).")
    return default


@dataclasses.dataclass(frozen=True)
class GGUFArch:
  """What baq knows of one GGUF architecture.

  Attributes:
    family: the baq LM family (`LM_FAMILIES`) whose converters it uses.
    model_type: the config.json model_type `gguf_to_hf` writes.
    permute_qk: q/k rows are permuted for llama.cpp's rotary convention.
    config_from_meta: `(meta, shapes, tied) -> DecoderConfig`; shapes maps
      GGUF tensor names to numpy shapes, tied says the head is the embedding.
    write_meta: `(writer, cfg)`: adds the `{arch}.*` metadata of `cfg`.
    hf_config: `cfg -> config.json dict` that the family's config_from_hf
      reads back into `cfg`.
    check: `cfg -> None`, raising ValueError naming a DecoderConfig field the
      architecture cannot express (before anything is written).
  """

  family: str
  model_type: str
  permute_qk: bool
  config_from_meta: Callable[[Meta, Mapping[str, tuple], bool], DecoderConfig]
  write_meta: Callable[[Any, DecoderConfig], None]
  hf_config: Callable[[DecoderConfig], dict]
  check: Callable[[DecoderConfig], None]


# Each family module registers the architectures it serves (llama.py: llama, qwen2).
GGUF_ARCHS: Registry[GGUFArch] = Registry("GGUF architecture", discover="baq.models.lm")


def register_arch(name: str, **fields) -> GGUFArch:
  """Registers GGUF architecture `name` (`general.architecture`); fields: see `GGUFArch`."""
  return GGUF_ARCHS.register(name)(GGUFArch(**fields))


def read_shape(meta: Meta, shapes: Mapping[str, tuple]) -> dict[str, Any]:
  """The `DecoderConfig` sizes every architecture keeps alike, as keyword arguments.

  The vocabulary is the embedding's row count (the `{arch}.vocab_size` key
  is optional in GGUF).
  """
  heads = int(meta(K.Attention.HEAD_COUNT))
  d_model = int(meta(K.LLM.EMBEDDING_LENGTH))
  return dict(vocab_size=int(shapes["token_embd.weight"][0]), d_model=d_model,
              n_layers=int(meta(K.LLM.BLOCK_COUNT)), n_heads=heads,
              n_kv_heads=int(meta(K.Attention.HEAD_COUNT_KV, heads)),
              head_dim=int(meta(K.Attention.KEY_LENGTH, d_model // heads)),
              d_ff=int(meta(K.LLM.FEED_FORWARD_LENGTH)), max_len=int(meta(K.LLM.CONTEXT_LENGTH)))


def f32(value: float) -> float:
  """A float GGUF stored as float32, as the shortest decimal that float32 rounds to
  it (9.99999974e-06 -> 1e-05): the same float32, and the config.json value."""
  return float(str(np.float32(value)))


def write_shape(writer, cfg: DecoderConfig) -> None:
  """The metadata `read_shape` reads (head_dim only where it is not d_model / n_heads)."""
  writer.add_context_length(cfg.max_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.n_layers)
  writer.add_feed_forward_length(cfg.d_ff)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(cfg.n_kv_heads)
  writer.add_vocab_size(cfg.vocab_size)
  if cfg.head_dim * cfg.n_heads != cfg.d_model:
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)


def refuse(cfg: DecoderConfig, arch: str, **wanted) -> None:
  """Raises ValueError naming the first `DecoderConfig` field that differs from `wanted`."""
  for field, want in wanted.items():
    if getattr(cfg, field) != want:
      raise ValueError(f"GGUF architecture {arch!r} cannot hold DecoderConfig.{field}="
                       f"{getattr(cfg, field)!r}; it needs {want!r}.")


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF rotate_half rows -> llama.cpp's (convert_hf_to_gguf.py's LlamaModel.permute).

  Args:
    w: q or k weight [n_heads * head_dim, in] (or its bias [n_heads * head_dim]).
    n_heads: the heads of w (query heads for q, key/value heads for k).

  Returns:
    The permuted array, same shape: within each head, row 2i is the old row
    i and row 2i + 1 the old row i + head_dim / 2.
  """
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of `permute_rows`: llama.cpp's q/k rows -> HF's rotate_half layout."""
  return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def hf_shapes(family: LMFamily, cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """The HF state-dict names and shapes of a float model of `cfg` (no arrays made)."""
  key = jax.random.key(0)
  abstract = jax.eval_shape(lambda: CausalLM(cfg).init(key, jnp.zeros((1, 1), jnp.int32)))
  zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), abstract["params"])
  return {k: tuple(v.shape) for k, v in family.from_params(zeros, cfg).items()}


def tensor_names(arch_name: str, hf_names, n_layers: int) -> dict[str, str]:
  """HF state-dict name -> GGUF tensor name, by the gguf package's own table.

  Raises:
    ValueError: a name the table does not map (named).
  """
  arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch_name]
  table = gguf.get_tensor_name_map(arch_id, n_layers)
  out = {}
  for name in hf_names:
    mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
      raise ValueError(f"The gguf package maps no {arch_name} tensor to HF name {name!r}.")
    out[name] = mapped
  return out


_QK = re.compile(r"blk\.\d+\.attn_([qk])\.(weight|bias)")


def _relayout(arch: GGUFArch, family: LMFamily, cfg: DecoderConfig, hf_name: str,
              gguf_name: str, value: np.ndarray, to_gguf: bool) -> np.ndarray:
  """One tensor between HF's layout and GGUF's (q/k permutation, Conv1D transpose)."""
  qk = _QK.fullmatch(gguf_name)
  if arch.permute_qk and qk:
    heads = cfg.n_heads if qk.group(1) == "q" else cfg.n_kv_heads
    return (permute_rows if to_gguf else unpermute_rows)(value, heads)
  conv1d = family.hf_conv1d and hf_name.endswith(".weight") and hf_name[:-len(".weight")] in (
      family.hf_modules(cfg) if family.hf_modules else ())
  return value.T if conv1d else value


def to_gguf_tensors(arch_name: str, family: LMFamily, cfg: DecoderConfig,
                    state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An HF state dict (the family's `from_params`) -> GGUF names and layouts.

  Args:
    arch_name: a `GGUF_ARCHS` name.
    family: the model's family.
    cfg: the model's config.
    state_dict: HF name -> array.

  Returns:
    GGUF name -> array (numpy [out, in] for every projection).
  """
  arch = GGUF_ARCHS.get(arch_name)
  names = tensor_names(arch_name, state_dict, cfg.n_layers)
  return {names[k]: _relayout(arch, family, cfg, k, names[k], np.asarray(v), True)
          for k, v in state_dict.items()}


def to_hf_state(arch_name: str, family: LMFamily, cfg: DecoderConfig,
                tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """GGUF tensors -> the HF state dict the family's `to_params` reads.

  Args:
    arch_name: a `GGUF_ARCHS` name.
    family: the family of `arch_name`.
    cfg: the config read from the metadata (a tied model's output.weight is
      expected to be dropped already).
    tensors: GGUF name -> float array.

  Returns:
    HF name -> array.

  Raises:
    ValueError: naming the GGUF tensors the model does not have, or lacks.
  """
  arch = GGUF_ARCHS.get(arch_name)
  names = tensor_names(arch_name, hf_shapes(family, cfg), cfg.n_layers)
  by_gguf = {g: h for h, g in names.items()}
  extra, missing = sorted(set(tensors) - set(by_gguf)), sorted(set(by_gguf) - set(tensors))
  if extra or missing:
    raise ValueError(f"GGUF tensors do not fit a {arch_name} model of this metadata: "
                     f"not in the model {extra[:8]}, missing {missing[:8]}.")
  return {h: _relayout(arch, family, cfg, h, g, tensors[g], False) for g, h in by_gguf.items()}
