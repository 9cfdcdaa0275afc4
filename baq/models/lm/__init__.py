"""Causal language models: one decoder (`decoder.py`) and a registry of checkpoint families.

A family is the knowledge of one kind of Hugging Face checkpoint: how its
config.json becomes a `DecoderConfig` and how its state dict's names and
layouts map onto the decoder's parameters (and back). Every non-underscore
module of this package is imported on the first lookup, so a new family is
one new file here that calls `register_family`; no other file changes. A
family describes its state dict as one `keys.Table`, whose generic
converters read it both ways:

    register_family("gpt2", model_types=("gpt2",), config_from_hf=config_from_hf,
                    hf_conv1d=True, **keys.converters(TABLE))

A family may also register `hf_modules(cfg)`, its quantizable modules under
their HF names with the baq layers each holds, which GPTQ checkpoints
(`baq.export.gptq_lm`) are keyed by.

`hf.load(folder)` picks the family by config.json's `model_type` through
`family_for_model_type`, which is the one place that knows the valid types.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import numpy as np

from baq.registry import Registry

StateDict = Mapping[str, np.ndarray]
# HF quantizable module name -> the baq layer paths it is made of, in column order.
HFModules = dict[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class LMFamily:
  """What a checkpoint family registers.

  Attributes:
    config_from_hf: `config_from_hf(hf_config: dict) -> DecoderConfig`; raises
      ValueError naming the field of a configuration it does not support.
    to_params: `to_params(state_dict, cfg) -> params` (nested dict of numpy
      arrays, views of the state dict's where the layout allows, so zero-cost
      arrays stay zero-cost); raises on a missing or unused key.
    from_params: `from_params(params, cfg) -> state_dict` under the family's
      Hugging Face names and layouts (bit-width leaves are left out).
    model_types: the config.json `model_type` values the family reads.
    hf_modules: optional `hf_modules(cfg) -> {HF module: (baq layer, ...)}`:
      every quantizable torch module under the names `from_params` writes,
      with the baq layers whose kernels are its columns, in order (GPT-2's
      fused c_attn holds q, k and v); what GPTQ checkpoints are keyed by.
    hf_conv1d: the hf_modules store their weight [in, out] (GPT-2's Conv1D)
      rather than torch Linear's [out, in].
  """

  config_from_hf: Callable[[dict], Any]
  to_params: Callable[[StateDict, Any], dict]
  from_params: Callable[[Any, Any], dict]
  model_types: tuple[str, ...]
  hf_modules: Optional[Callable[[Any], HFModules]] = None
  hf_conv1d: bool = False


LM_FAMILIES: Registry[LMFamily] = Registry("language-model family", discover="baq.models.lm")


def register_family(name: str, *, model_types: tuple[str, ...],
                    config_from_hf: Callable[[dict], Any],
                    to_params: Callable[[StateDict, Any], dict],
                    from_params: Callable[[Any, Any], dict],
                    hf_modules: Optional[Callable[[Any], HFModules]] = None,
                    hf_conv1d: bool = False) -> LMFamily:
  """Registers a checkpoint family under `name`.

  Args:
    name: the family's registry name (returned by `hf.load`).
    model_types: config.json `model_type` values it reads (a type claimed by
      two families makes every lookup raise, so none is ever ambiguous).
    config_from_hf: see `LMFamily`.
    to_params: see `LMFamily`.
    from_params: see `LMFamily`.
    hf_modules: see `LMFamily` (optional; GPTQ checkpoints need it).
    hf_conv1d: see `LMFamily`.

  Returns:
    The registered `LMFamily`.
  """
  family = LMFamily(config_from_hf, to_params, from_params, tuple(model_types), hf_modules,
                    bool(hf_conv1d))
  return LM_FAMILIES.register(name)(family)


def supported_model_types() -> dict[str, str]:
  """Every supported config.json `model_type`, mapped to its family's name.

  Raises:
    ValueError: two families claim one model_type.
  """
  types: dict[str, str] = {}
  for name in LM_FAMILIES.names():
    for t in LM_FAMILIES.get(name).model_types:
      if t in types:
        raise ValueError(f"model_type {t!r} is claimed by families {types[t]!r} and {name!r}.")
      types[t] = name
  return types


def family_for_model_type(model_type: str) -> str:
  """The name of the family that reads checkpoints of `model_type`.

  Args:
    model_type: config.json's `model_type` ("gpt2", "llama", ...).

  Returns:
    The family's registry name (`LM_FAMILIES.get(name)` is the family).

  Raises:
    KeyError: no family reads `model_type`; the message lists the valid ones.
  """
  types = supported_model_types()
  if model_type not in types:
    raise KeyError(f"Unsupported Hugging Face model_type {model_type!r}. Valid model_types: "
                   f"{', '.join(sorted(types)) or '(none registered)'}.")
  return types[model_type]
