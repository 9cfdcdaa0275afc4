# Over 300 lines by 3: the layouts' tables and the loaders (convert.load*) belong together.
"""Hugging Face and OpenCLIP checkpoints of CLIP <-> `CLIP` params, and local loaders.

Each layout is one table of rows (baq leaf path, checkpoint key, kind) read
in both directions, so import and export cannot drift apart. Kinds: "id"
(stored as the model holds it), "t" (a torch Linear's [out, in] weight, the
transpose of a Flax kernel) and "conv" (torch OIHW -> Flax HWIO).

Hugging Face (`CLIPModel`): vision_model.{embeddings.{patch_embedding,
class_embedding, position_embedding}, pre_layrnorm, encoder.layers.{i}.
{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1,fc2}},
post_layernorm}, visual_projection, text_model.{embeddings.{token_embedding,
position_embedding}, encoder.layers.{i}..., final_layer_norm},
text_projection, logit_scale. The position_ids buffers older files carry are
skipped on import and written on export only when asked for.

OpenCLIP (`open_clip.CLIP`, ViT towers): visual.{conv1, class_embedding,
positional_embedding, ln_pre, transformer.resblocks.{i}.{ln_1,
attn.{in_proj_weight, in_proj_bias, out_proj}, ln_2, mlp.{c_fc, c_proj}},
ln_post, proj}, token_embedding, positional_embedding, transformer.
resblocks.{i}..., ln_final, text_projection, logit_scale. The fused
in_proj [3w, w] holds rows q | k | v: it is split into views named
"attn.in_proj[q].weight" (the keys errors name) and fused back on export.
visual.proj and text_projection are [w, embed] matrices used as x @ proj,
already Flax kernels. A "module." prefix (a DDP training checkpoint) is
stripped.

    model, variables, tokenizer = load("/ckpt/clip-vit-base-patch32")
    model, variables = load_open_clip("/ckpt/open_clip_model.safetensors", "ViT-B-32.json")
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Union

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from baq.models.clip.configs import CLIPConfig, config_from_hf, config_from_open_clip
from baq.models.clip.model import CLIP, dummy_inputs
from baq.models.lm.hf import Checkpoint, read_folder
from baq.quant.inject import QUANT_LEAVES, Quantizer

Table = list[tuple[str, str, str]]
TRANSFORMS = {"id": (lambda a: a, lambda a: a), "t": (lambda a: a.T, lambda a: a.T),
              "conv": (lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))}
HF_BLOCK = (("attn_norm", "layer_norm1"), ("attn/q_proj", "self_attn.q_proj"),
            ("attn/k_proj", "self_attn.k_proj"), ("attn/v_proj", "self_attn.v_proj"),
            ("attn/o_proj", "self_attn.out_proj"), ("mlp_norm", "layer_norm2"),
            ("mlp/fc1", "mlp.fc1"), ("mlp/fc2", "mlp.fc2"))
OPEN_CLIP_BLOCK = (("attn_norm", "ln_1"), ("attn/q_proj", "attn.in_proj[q]"),
                   ("attn/k_proj", "attn.in_proj[k]"), ("attn/v_proj", "attn.in_proj[v]"),
                   ("attn/o_proj", "attn.out_proj"), ("mlp_norm", "ln_2"),
                   ("mlp/fc1", "mlp.c_fc"), ("mlp/fc2", "mlp.c_proj"))
HF_PATCH, OPEN_CLIP_PATCH = "vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"
HF_BUFFERS = (r"(vision|text)_model\.embeddings\.position_ids",)
# The causal-mask buffer and the metadata OpenAI's own checkpoints carry.
OPEN_CLIP_BUFFERS = (r"attn_mask", r"input_resolution", r"context_length", r"vocab_size")
_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _module(path: str, key: str) -> Table:
  """The rows of a LayerNorm (path ends in "norm") or of a Linear with a bias."""
  if path.endswith("norm"):
    return [(f"{path}/scale", f"{key}.weight", "id"), (f"{path}/bias", f"{key}.bias", "id")]
  return [(f"{path}/kernel", f"{key}.weight", "t"), (f"{path}/bias", f"{key}.bias", "id")]


def _table(cfg: CLIPConfig, names: Mapping[str, str], block) -> Table:
  rows = [("vision/patch_embed/kernel", names["patch"], "conv"),
          ("vision/class_embed", names["cls"], "id"),
          ("vision/pos_embed/embedding", names["vision_pos"], "id"),
          *_module("vision/pre_norm", names["pre_norm"]),
          *_module("vision/post_norm", names["post_norm"]),
          ("visual_projection/kernel", *names["visual_projection"]),
          ("text/token_embed/embedding", names["token"], "id"),
          ("text/pos_embed/embedding", names["text_pos"], "id"),
          *_module("text/final_norm", names["final_norm"]),
          ("text_projection/kernel", *names["text_projection"]),
          ("logit_scale", "logit_scale", "id")]
  for tower, layers in (("vision", cfg.vision.layers), ("text", cfg.text.layers)):
    for i in range(layers):
      for path, key in block:
        rows += _module(f"{tower}/block_{i}/{path}", names[tower + "_block"].format(i) + key)
  return rows


def hf_table(cfg: CLIPConfig) -> Table:
  """(baq path, HF key, kind) of every leaf of `CLIP(cfg)` in Hugging Face's layout."""
  v, t = "vision_model.", "text_model."
  return _table(cfg, dict(
      patch=HF_PATCH, cls=v + "embeddings.class_embedding",
      vision_pos=v + "embeddings.position_embedding.weight", pre_norm=v + "pre_layrnorm",
      post_norm=v + "post_layernorm", visual_projection=("visual_projection.weight", "t"),
      token=t + "embeddings.token_embedding.weight",
      text_pos=t + "embeddings.position_embedding.weight", final_norm=t + "final_layer_norm",
      text_projection=("text_projection.weight", "t"), vision_block=v + "encoder.layers.{}.",
      text_block=t + "encoder.layers.{}."), HF_BLOCK)


def open_clip_table(cfg: CLIPConfig) -> Table:
  """(baq path, OpenCLIP key, kind) of every leaf, q/k/v under their split names."""
  return _table(cfg, dict(
      patch=OPEN_CLIP_PATCH, cls="visual.class_embedding",
      vision_pos="visual.positional_embedding", pre_norm="visual.ln_pre",
      post_norm="visual.ln_post",
      visual_projection=("visual.proj", "id"), token="token_embedding.weight",
      text_pos="positional_embedding", final_norm="ln_final",
      text_projection=("text_projection", "id"),
      vision_block="visual.transformer.resblocks.{}.", text_block="transformer.resblocks.{}."),
      OPEN_CLIP_BLOCK)


def _to_params(state: Mapping[str, np.ndarray], table: Table, known=()) -> dict:
  ck = Checkpoint(state)
  flat = {path: TRANSFORMS[kind][0](ck.take(key)) for path, key, kind in table}
  ck.finish(known)  # an unused key is an error naming it
  return tu.unflatten_dict(flat, sep="/")


def _from_params(params, table: Table) -> dict[str, np.ndarray]:
  flat = {k: v for k, v in tu.flatten_dict(dict(params), sep="/").items()
          if k.rsplit("/", 1)[-1] not in QUANT_LEAVES}
  extra = sorted(set(flat) - {path for path, _, _ in table})
  if extra:
    raise ValueError(f"Params the checkpoint layout has no key for: {extra[:8]}.")
  # C order: safetensors' numpy writer stores an array's memory as is, so a
  # transposed view would be written wrong.
  return {key: np.array(TRANSFORMS[kind][1](np.asarray(flat[path])), order="C")
          for path, key, kind in table}


def _refuse_other_layout(state, own: str, other: str, loader: str) -> None:
  if own not in state and other in state:
    raise ValueError(f"The state dict holds {other!r}, not {own!r}: it is in the other layout; "
                     f"read it with {loader}.")


def hf_to_params(state_dict: Mapping[str, np.ndarray], cfg: CLIPConfig) -> dict:
  """Hugging Face CLIPModel state dict -> `CLIP` params (numpy views where possible).

  Raises:
    KeyError: a key the model needs is missing (named).
    ValueError: an unused key (named; position_ids buffers aside) or OpenCLIP's layout.
  """
  _refuse_other_layout(state_dict, HF_PATCH, OPEN_CLIP_PATCH, "load_open_clip")
  return _to_params(state_dict, hf_table(cfg), HF_BUFFERS)


def hf_from_params(params, cfg: CLIPConfig, position_ids: bool = False) -> dict[str, np.ndarray]:
  """`CLIP` params -> Hugging Face state dict (quantizer leaves left out).

  Args:
    params: nested params.
    cfg: the model's configuration.
    position_ids: also write the int64 position_ids buffers of older files.
  """
  sd = _from_params(params, hf_table(cfg))
  if position_ids:
    for tower, n in (("vision", cfg.vision.positions), ("text", cfg.text.context_length)):
      sd[f"{tower}_model.embeddings.position_ids"] = np.arange(n, dtype=np.int64)[None]
  return sd


def open_clip_to_params(state_dict: Mapping[str, np.ndarray], cfg: CLIPConfig) -> dict:
  """OpenCLIP CLIP state dict -> `CLIP` params (q/k/v are views of the fused in_proj).

  Raises:
    KeyError: a key the model needs is missing (named; split q/k/v as "in_proj[q]";
      keys are named without the "module." prefix).
    ValueError: an unused key (named), an in_proj whose rows are not 3 equal parts, or
      Hugging Face's layout.
  """
  state = {k.removeprefix("module."): v for k, v in state_dict.items()}
  _refuse_other_layout(state, OPEN_CLIP_PATCH, HF_PATCH, "load")
  split = {}
  for key, value in state.items():
    m = re.fullmatch(r"(.*attn\.)in_proj_(weight|bias)", key)
    if m is None:
      split[key] = value
      continue
    if np.shape(value)[0] % 3:
      raise ValueError(f"{key} of shape {np.shape(value)} does not split into q | k | v rows.")
    rows = np.shape(value)[0] // 3
    for j, name in enumerate("qkv"):
      split[f"{m[1]}in_proj[{name}].{m[2]}"] = value[j * rows:(j + 1) * rows]
  return _to_params(split, open_clip_table(cfg), OPEN_CLIP_BUFFERS)


def open_clip_from_params(params, cfg: CLIPConfig) -> dict[str, np.ndarray]:
  """`CLIP` params -> OpenCLIP state dict, q/k/v fused into in_proj_weight / in_proj_bias."""
  sd, out = _from_params(params, open_clip_table(cfg)), {}
  for key, value in sd.items():
    m = re.fullmatch(r"(.*attn\.)in_proj\[([qkv])\]\.(weight|bias)", key)
    if m is None:
      out[key] = value
    elif m[2] == "q":
      out[f"{m[1]}in_proj_{m[3]}"] = np.concatenate(
          [sd[f"{m[1]}in_proj[{n}].{m[3]}"] for n in "qkv"])
  return out


def check_params(model: CLIP, params, table: Table) -> None:
  """Checks converted params against `jax.eval_shape` of the model's init (no arrays made).

  Raises:
    ValueError: naming every shape mismatch by checkpoint key, with the
      checkpoint's and the model's shapes in the checkpoint's layout.
  """
  key = jax.random.key(0)
  init = jax.eval_shape(lambda: model.init({"params": key, "quant": key},
                                           *dummy_inputs(model.config)))["params"]
  want = {k: v.shape for k, v in tu.flatten_dict(init, sep="/").items()
          if k.rsplit("/", 1)[-1] not in QUANT_LEAVES}
  have = {k: np.shape(v) for k, v in tu.flatten_dict(dict(params), sep="/").items()}
  as_stored = lambda kind, shape: TRANSFORMS[kind][1](np.broadcast_to(np.float32(0), shape)).shape
  bad = [f"{ck}: checkpoint {as_stored(kind, have[p])} vs model {as_stored(kind, want[p])}"
         for p, ck, kind in table if p in have and p in want and have[p] != want[p]]
  odd = sorted(set(have) ^ set(want))
  if bad or odd:
    raise ValueError(f"The checkpoint does not fit the model: shape mismatches {bad[:8]}; "
                     f"leaves only one side has {odd[:8]}.")


def _build(cfg: CLIPConfig, params, quant: Optional[Quantizer], table: Table):
  model = CLIP(cfg, quant)
  check_params(model, params, table)
  params = jax.tree.map(jnp.asarray, params)
  if quant is not None:
    # A forward with `params` mutable adds only the leaves the checkpoint lacks
    # (bit-widths, learned ranges), computed from the loaded kernels.
    key = jax.random.key(0)
    _, new = model.apply({"params": params}, *dummy_inputs(cfg),
                         rngs={"params": key, "quant": key}, mutable=["params"])
    params = new["params"]
  return model, {"params": params}


def load(folder: str, quant: Optional[Quantizer] = None) -> tuple[CLIP, dict, Any]:
  """Reads a local Hugging Face CLIP folder.

  Args:
    folder: config.json, model.safetensors (or an index and its shards) and
      optionally tokenizer.json.
    quant: quantization factory, or None for the float model.

  Returns:
    (model, variables {"params"}, tokenizers.Tokenizer or None).

  Raises:
    FileNotFoundError: a missing file, named.
    KeyError: a checkpoint key the model needs, named.
    ValueError: an unsupported config field, an unused key or a shape mismatch, named.
  """
  hf_config, state, tokenizer = read_folder(folder)
  cfg = config_from_hf(hf_config)
  return (*_build(cfg, hf_to_params(state, cfg), quant, hf_table(cfg)), tokenizer)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """One safetensors file as numpy, half-precision tensors cast to float32."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Weights file {path!r} is missing.")
  if not path.endswith(".safetensors"):
    raise ValueError(f"{path!r} is not a .safetensors file; torch pickles (.bin, .pt) need "
                     f"torch: save the state dict with safetensors first.")
  with safe_open(path, framework="numpy") as f:
    state = {k: f.get_tensor(k) for k in f.keys()}
  return {k: v.astype(np.float32) if v.dtype in _HALF else v for k, v in state.items()}


def load_open_clip(weights_path: str, model_config: Union[str, Mapping[str, Any]],
                   quant: Optional[Quantizer] = None) -> tuple[CLIP, dict]:
  """Reads OpenCLIP weights (open_clip_model.safetensors) with their model config.

  Args:
    weights_path: the safetensors state dict.
    model_config: the model-config JSON (a path, e.g. ViT-B-32.json, or its dict).
    quant: quantization factory, or None for the float model.

  Returns:
    (model, variables {"params"}).

  Raises:
    FileNotFoundError: a missing file, named.
    KeyError: a checkpoint key the model needs, named.
    ValueError: an unsupported OpenCLIP option, an unused key or a shape mismatch, named.
  """
  if isinstance(model_config, str):
    if not os.path.isfile(model_config):
      raise FileNotFoundError(f"OpenCLIP model config {model_config!r} is missing.")
    with open(model_config) as f:
      model_config = json.load(f)
  cfg = config_from_open_clip(model_config)
  state = read_safetensors(weights_path)
  return _build(cfg, open_clip_to_params(state, cfg), quant, open_clip_table(cfg))
