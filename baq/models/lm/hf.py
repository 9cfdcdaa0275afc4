"""Local Hugging Face checkpoint folders into a `CausalLM` and its variables.

A folder holds config.json, the weights (model.safetensors, or the shards
that model.safetensors.index.json names) and optionally tokenizer.json.
`load` picks the family by config.json's `model_type`, builds the
`DecoderConfig`, converts the state dict and checks every converted leaf
against the shapes `jax.eval_shape` gives for the model's own init, so a
wrong config or a foreign checkpoint fails here, naming the key, and not as
a broadcasting error deep in a forward pass.

The families' converters share `Checkpoint` (take keys by name, report the
ones left over) and the torch-layout helpers below: a torch nn.Linear holds
[out, in] (a Flax kernel is its transpose), GPT-2's Conv1D already [in, out].

    model, variables, tokenizer, family = hf.load("/ckpt/opt-125m")
    logits = model.apply(variables, tokens)
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer

from baq.models.lm import LM_FAMILIES, family_for_model_type
from baq.models.lm.decoder import CausalLM
from baq.quant.inject import QUANT_LEAVES, Quantizer

CONFIG, WEIGHTS, INDEX, TOKENIZER = ("config.json", "model.safetensors",
                                     "model.safetensors.index.json", "tokenizer.json")
_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _path(folder: str, name: str, what: str = "") -> str:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what or name} is missing from checkpoint folder {folder!r}.")
  return path


def read_state_dict(folder: str) -> dict[str, np.ndarray]:
  """The folder's safetensors weights, half-precision tensors cast to float32.

  Args:
    folder: holds model.safetensors, or model.safetensors.index.json and its shards.

  Returns:
    name -> numpy array.

  Raises:
    FileNotFoundError: naming the missing file (weights, index or a shard).
  """
  if os.path.isfile(os.path.join(folder, WEIGHTS)):
    files, expected = [WEIGHTS], None
  elif os.path.isfile(os.path.join(folder, INDEX)):
    with open(os.path.join(folder, INDEX)) as f:
      expected = json.load(f)["weight_map"]
    files = sorted(set(expected.values()))
    for shard in files:  # all checked before any is read: a partial download fails fast
      _path(folder, shard, f"Shard {shard!r} (named by {INDEX})")
  else:
    raise FileNotFoundError(f"Neither {WEIGHTS} nor {INDEX} is in checkpoint folder {folder!r}.")
  state = {}
  for name in files:
    # framework="numpy" returns bf16 as ml_dtypes.bfloat16 (safetensors >= 0.4).
    with safe_open(os.path.join(folder, name), framework="numpy") as f:
      for key in f.keys():
        value = f.get_tensor(key)
        state[key] = value.astype(np.float32) if value.dtype in _HALF else value
  missing = sorted(set(expected or ()) - set(state))
  if missing:
    raise ValueError(f"{INDEX} in {folder!r} names tensors its shards lack: {missing[:8]}.")
  return state


def read_folder(folder: str) -> tuple[dict, dict[str, np.ndarray], Optional[Any]]:
  """(config.json as a dict, the state dict, the tokenizers.Tokenizer or None)."""
  with open(_path(folder, CONFIG)) as f:
    hf_config = json.load(f)
  state = read_state_dict(folder)
  tokenizer = None
  if os.path.isfile(os.path.join(folder, TOKENIZER)):
    tokenizer = Tokenizer.from_file(os.path.join(folder, TOKENIZER))
  return hf_config, state, tokenizer


def config_value(hf_config: Mapping[str, Any], field: str, default: Any,
                 supported: Optional[tuple] = None) -> Any:
  """config.json's `field` (HF's `default` when absent), refused unless `supported`.

  Raises:
    ValueError: naming the field, its value and the supported values.
  """
  value = hf_config.get(field, default)
  if supported is not None and value not in supported:
    raise ValueError(f"{hf_config.get('model_type')} checkpoints with {field}={value!r} are "
                     f"not supported; supported: {', '.join(map(repr, supported))}.")
  return value


class Checkpoint:
  """A state dict under conversion: keys are taken by name, leftovers are an error.

  Args:
    state_dict: name -> array.
    prefix: stripped where present ("transformer.", "model."), so a
      checkpoint of the bare base model and of the causal LM read alike.
  """

  def __init__(self, state_dict: Mapping[str, np.ndarray], prefix: str = ""):
    self._state = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v
                   for k, v in state_dict.items()}
    self._taken: set[str] = set()

  def has(self, key: str) -> bool:
    return key in self._state

  def take(self, key: str) -> np.ndarray:
    if key not in self._state:
      raise KeyError(f"The checkpoint has no {key!r} (names relative to the model prefix).")
    self._taken.add(key)
    return np.asarray(self._state[key])  # views stay views: zero-cost arrays stay zero-cost

  def linear(self, name: str, bias: bool, conv1d: bool = False) -> dict[str, np.ndarray]:
    """{kernel (in, out)[, bias]} of torch Linear (or GPT-2 Conv1D) `name`."""
    w = self.take(f"{name}.weight")
    out = {"kernel": w if conv1d else w.T}
    if bias:
      out["bias"] = self.take(f"{name}.bias")
    return out

  def norm(self, name: str, bias: bool) -> dict[str, np.ndarray]:
    out = {"scale": self.take(f"{name}.weight")}
    if bias:
      out["bias"] = self.take(f"{name}.bias")
    return out

  def finish(self, known: Iterable[str] = ()) -> None:
    """Raises ValueError naming every key not taken that matches no `known` regex."""
    known = tuple(known)
    left = sorted(k for k in self._state if k not in self._taken
                  and not any(re.fullmatch(p, k) for p in known))
    if left:
      raise ValueError(f"{len(left)} checkpoint keys are not used by the model: {left[:8]}.")


def nest(modules: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
  """{"block_0/attn/q_proj": {"kernel": w}} -> the nested params dict."""
  return tu.unflatten_dict({f"{m}/{leaf}": v for m, leaves in modules.items()
                            for leaf, v in leaves.items()}, sep="/")


def modules(params: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
  """The inverse of `nest`, as numpy, without the quantizer's own leaves."""
  out: dict[str, dict[str, np.ndarray]] = {}
  for path, v in tu.flatten_dict(dict(params)).items():
    if path[-1] not in QUANT_LEAVES:
      out.setdefault("/".join(path[:-1]), {})[path[-1]] = np.asarray(v)
  return out


def torch_linear(leaves: Mapping[str, np.ndarray], name: str,
                 conv1d: bool = False) -> dict[str, np.ndarray]:
  """{name.weight, name.bias} of a Dense's leaves, in torch Linear (or Conv1D) layout.

  The weights are numpy views (a transposed kernel is not copied, so
  full-size state dicts of zero-cost arrays stay zero-cost); safetensors'
  numpy writer stores an array's memory as is, so write
  `np.ascontiguousarray` of them, as `baq.export.gptq_format` does.
  """
  out = {f"{name}.weight": leaves["kernel"] if conv1d else leaves["kernel"].T}
  if "bias" in leaves:
    out[f"{name}.bias"] = leaves["bias"]
  return out


def torch_norm(leaves: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
  out = {f"{name}.weight": leaves["scale"]}
  if "bias" in leaves:
    out[f"{name}.bias"] = leaves["bias"]
  return out


def _init_shapes(model: CausalLM) -> dict[str, tuple[int, ...]]:
  key = jax.random.key(0)
  shapes = jax.eval_shape(lambda: model.init({"params": key, "quant": key},
                                             jnp.zeros((1, 1), jnp.int32)))["params"]
  return {k: tuple(v.shape) for k, v in tu.flatten_dict(shapes, sep="/").items()
          if k.rsplit("/", 1)[-1] not in QUANT_LEAVES}


def check_params(model: CausalLM, params: Mapping[str, Any]) -> None:
  """Checks converted params against the model's init shapes (no arrays are made).

  Args:
    model: the model the params are for.
    params: nested params (numpy or jax arrays), without quantizer leaves.

  Raises:
    ValueError: naming the keys the model lacks or needs, and every shape
      mismatch with both shapes.
  """
  want = _init_shapes(model)
  have = {k: tuple(np.shape(v)) for k, v in tu.flatten_dict(dict(params), sep="/").items()}
  extra, missing = sorted(set(have) - set(want)), sorted(set(want) - set(have))
  bad = [f"{k}: checkpoint {have[k]} vs model {want[k]}"
         for k in sorted(set(have) & set(want)) if have[k] != want[k]]
  if extra or missing or bad:
    raise ValueError(f"Converted params do not fit the model: shape mismatches {bad[:8]}, "
                     f"not in the model {extra[:8]}, missing {missing[:8]}.")


def add_quant_leaves(model: CausalLM, params: dict) -> dict:
  """`params` with the quantizer's leaves (bit-widths, ranges) added at their init values."""
  # Running the model with `params` mutable creates only the leaves it lacks
  # (bit-widths, learned ranges), from the converted kernels.
  key = jax.random.key(0)
  _, new = model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32),
                       rngs={"params": key, "quant": key}, mutable=["params"])
  return new["params"]


def load(folder: str, quant: Optional[Quantizer] = None) -> tuple[CausalLM, dict, Any, str]:
  """Reads a Hugging Face checkpoint folder into a baq model.

  Args:
    folder: config.json, safetensors weights and optionally tokenizer.json.
    quant: quantization factory, or None for the float model; its bit-width
      leaves start at their specs' init values.

  Returns:
    (model, variables {"params"}, tokenizer or None, family name).

  Raises:
    FileNotFoundError: a file is missing (named).
    KeyError: the model_type is unsupported (the valid ones are listed) or a
      checkpoint key is missing.
    ValueError: an unsupported config field, an unused checkpoint key or a
      shape mismatch (named).
  """
  hf_config, state, tokenizer = read_folder(folder)
  name = family_for_model_type(hf_config.get("model_type"))
  family = LM_FAMILIES.get(name)
  cfg = family.config_from_hf(hf_config)
  params = family.to_params(state, cfg)
  model = CausalLM(cfg, quant)
  check_params(model, params)
  params = jax.tree.map(jnp.asarray, params)
  if quant is not None:
    params = add_quant_leaves(model, params)
  return model, {"params": params}, tokenizer, name
