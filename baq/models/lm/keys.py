"""A causal-LM family's checkpoint layout as one table, read in both directions.

A family describes its Hugging Face state dict as a `Table` of `Key` rows
(baq module, HF module, kind, bias): the model-level rows before and after
the decoder blocks, and the rows of one block. `to_params`, `from_params`
and `hf_modules` all read that one table, so import, export and the GPTQ
module names cannot drift apart. Kinds:

  "embed"   nn.Embedding: {name}.weight is the baq `embedding` as is.
  "norm"    LayerNorm / RMSNorm: weight -> scale (and bias, when `bias`).
  "linear"  torch Linear: weight [out, in] is the transpose of the kernel.
  "conv1d"  GPT-2's Conv1D: weight [in, out] is already the kernel.
  "qkv"     GPT-2's fused c_attn, a Conv1D whose d_model-wide column blocks
            are q | k | v: its baq module is the tuple of the three layers,
            split into column views on import and concatenated on export.

`bias` is True, False or the name of the `DecoderConfig` field that says
whether the checkpoint has one ("attn_bias"); export writes whatever
biases the params hold. The head is the same in every family: lm_head.weight
(outside the model prefix, the kernel's transpose) only when
cfg.tie_embeddings is false; a tied head saved anyway is skipped on import.

Imported arrays are numpy views of the state dict's, and exported ones of
the params' (a transposed kernel is not copied, so zero-cost arrays stay
zero-cost); only the fused qkv export is a new array.

    register_family("opt", ..., **keys.converters(TABLE))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Union

import numpy as np

from baq.models.lm.hf import Checkpoint, modules, nest, torch_linear, torch_norm

KINDS = ("embed", "norm", "linear", "conv1d", "qkv")
QUANTIZABLE = ("linear", "conv1d", "qkv")  # the kinds `hf_modules` lists
TIED_HEAD = r"lm_head\.weight"


class Key(NamedTuple):
  """One row: baq module path (a tuple for "qkv"), HF module name, kind, bias."""

  ours: Union[str, tuple[str, ...]]
  theirs: str
  kind: str
  bias: Union[bool, str] = True


@dataclasses.dataclass(frozen=True)
class Table:
  """A family's state-dict layout.

  Attributes:
    prefix: the causal LM's prefix ("transformer.", "model."), stripped on
      import where present and written on export.
    block: block i's HF name prefix, formatted with `i` ("h.{i}.").
    blocks: the rows of one decoder block (baq names under "block_{i}/").
    first: model-level rows before the blocks (the embeddings).
    last: model-level rows after the blocks (the final norm).
    buffers: regexes of non-parameter keys that import skips.
  """

  prefix: str
  block: str
  blocks: tuple[Key, ...]
  first: tuple[Key, ...]
  last: tuple[Key, ...] = ()
  buffers: tuple[str, ...] = ()

  def __post_init__(self):
    bad = [k for k in self.first + self.blocks + self.last if k.kind not in KINDS]
    if bad:
      raise ValueError(f"Unknown key kinds {bad}; valid kinds: {', '.join(KINDS)}.")


def _bias(key: Key, cfg) -> bool:
  return getattr(cfg, key.bias) if isinstance(key.bias, str) else key.bias


def _read(ck: Checkpoint, key: Key, hf: str, baq: str, cfg, p: dict) -> None:
  """Takes `key`'s arrays (HF names under `hf`) into p[baq + module]."""
  name, bias = hf + key.theirs, _bias(key, cfg)
  if key.kind == "embed":
    p[baq + key.ours] = {"embedding": ck.take(name + ".weight")}
  elif key.kind == "norm":
    p[baq + key.ours] = ck.norm(name, bias)
  elif key.kind == "qkv":
    fused, d = ck.linear(name, bias, conv1d=True), cfg.d_model
    for j, ours in enumerate(key.ours):
      p[baq + ours] = {leaf: v[..., j * d:(j + 1) * d] for leaf, v in fused.items()}
  else:
    p[baq + key.ours] = ck.linear(name, bias, conv1d=key.kind == "conv1d")


def _write(m: Mapping[str, dict], key: Key, hf: str, baq: str, sd: dict) -> None:
  """Writes module `key`'s leaves (baq names under `baq`) into sd[hf + ...]."""
  name = hf + key.theirs
  if key.kind == "embed":
    sd[name + ".weight"] = m[baq + key.ours]["embedding"]
  elif key.kind == "norm":
    sd.update(torch_norm(m[baq + key.ours], name))
  elif key.kind == "qkv":
    parts = [m[baq + ours] for ours in key.ours]
    sd.update({f"{name}.{torch}": np.concatenate([q[leaf] for q in parts], axis=-1)
               for leaf, torch in (("kernel", "weight"), ("bias", "bias")) if leaf in parts[0]})
  else:
    sd.update(torch_linear(m[baq + key.ours], name, conv1d=key.kind == "conv1d"))


def to_params(table: Table, state_dict: Mapping[str, np.ndarray], cfg) -> dict:
  """A family's HF state dict -> `CausalLM` params (numpy views where possible).

  Args:
    table: the family's layout.
    state_dict: HF names (with or without `table.prefix`) -> arrays.
    cfg: the `DecoderConfig` (n_layers, tie_embeddings and bias fields).

  Returns:
    Nested params.

  Raises:
    KeyError: a key the model needs is missing.
    ValueError: a key is left unused (other than `table.buffers` and a tied head).
  """
  ck, p = Checkpoint(state_dict, table.prefix), {}
  for key in table.first + table.last:
    _read(ck, key, "", "", cfg, p)
  for i in range(cfg.n_layers):
    for key in table.blocks:
      _read(ck, key, table.block.format(i=i), f"block_{i}/", cfg, p)
  if not cfg.tie_embeddings:
    p["lm_head"] = {"kernel": ck.take("lm_head.weight").T}
  ck.finish(table.buffers + ((TIED_HEAD,) if cfg.tie_embeddings else ()))
  return nest(p)


def from_params(table: Table, params: Mapping[str, Any], cfg) -> dict[str, np.ndarray]:
  """`CausalLM` params -> the family's HF state dict (`table.prefix` names, no buffers).

  Args:
    table: the family's layout.
    params: nested params (quantizer leaves are ignored).
    cfg: the model's `DecoderConfig`.

  Returns:
    HF names -> numpy arrays (lm_head.weight only when untied).
  """
  m, t, sd = modules(params), table.prefix, {}
  for key in table.first:
    _write(m, key, t, "", sd)
  for i in range(cfg.n_layers):
    for key in table.blocks:
      _write(m, key, t + table.block.format(i=i), f"block_{i}/", sd)
  for key in table.last:
    _write(m, key, t, "", sd)
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = m["lm_head"]["kernel"].T
  return sd


def hf_modules(table: Table, cfg) -> dict[str, tuple[str, ...]]:
  """The family's quantizable HF modules -> the baq layers each holds, in column order.

  Args:
    table: the family's layout.
    cfg: the model's `DecoderConfig`.

  Returns:
    {prefix + block + module: ("block_{i}/attn/q_proj", ...), ...} for every
    linear, conv1d and qkv row of every block, in table order.
  """
  out = {}
  for i in range(cfg.n_layers):
    for key in table.blocks:
      if key.kind in QUANTIZABLE:
        ours = key.ours if isinstance(key.ours, tuple) else (key.ours,)
        out[table.prefix + table.block.format(i=i) + key.theirs] = tuple(
            f"block_{i}/{o}" for o in ours)
  return out


def converters(table: Table) -> dict[str, Any]:
  """`register_family`'s to_params, from_params and hf_modules for `table`.

  Args:
    table: the family's layout.

  Returns:
    {"to_params": ..., "from_params": ..., "hf_modules": ...}, each `table` bound.
  """
  return {"to_params": functools.partial(to_params, table),
          "from_params": functools.partial(from_params, table),
          "hf_modules": functools.partial(hf_modules, table)}
