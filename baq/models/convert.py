"""Pretrained torchvision / timm weights into baq's Flax variables, and back.

A PyTorch key maps to a Flax path in three steps: (1) a few per-model
renames (`KeyRules.renames`, e.g. torchvision's "conv1." -> "stem_conv.";
each family registers its own rules beside its builder, see
`baq.models.register_model`),
(2) list indices joined to the name before them ("layer1.0.conv1" ->
"layer1_0/conv1", "blocks.3.attn.qkv" -> "blocks_3/attn/qkv"), and (3) the
leaf: conv weights OIHW -> HWIO, linear weights (out, in) -> (in, out),
BatchNorm/LayerNorm weight -> scale, running_mean/var -> batch_stats mean/var;
tokens, position embeddings and attention bias tables keep their names and
shapes. Fused qkv weights need nothing more than the transpose, because the
models keep timm's output layout.

    model = build_model("resnet18", 10, quant)
    init = model.init({"params": key, "quant": key}, x)
    variables = convert("resnet18", "resnet18.pth", init,
                        allow_head_mismatch=True)

Any source key left unused and any target leaf left unfilled is an error
(bit-width leaves are never in a source and stay at init; with
`allow_head_mismatch` a head of another shape stays at init as well).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Union

import flax.traverse_util as tu
import jax.numpy as jnp
import numpy as np

from baq import models
from baq.models.layers import resize_pos_embed
from baq.quant.inject import BITS_LEAF, RANGE_LEAF

Source = Union[str, os.PathLike, Mapping[str, Any]]
_SKIPPED = ("num_batches_tracked", "attention_bias_idxs")  # buffers rebuilt by the model
_QUANT_LEAVES = (BITS_LEAF, RANGE_LEAF)


@dataclasses.dataclass(frozen=True)
class KeyRules:
  """How one architecture's PyTorch names differ from the generic mapping.

  Attributes:
    renames: (torch fragment, flax fragment) pairs in dotted form; a leading
      "^" anchors at the start. The first matching pair applies, both ways.
    heads: top-level Flax modules that form the classifier.
  """

  renames: tuple[tuple[str, str], ...] = ()
  heads: tuple[str, ...] = ("head",)


def _rename(key: str, pairs) -> str:
  for src, dst in pairs:
    anchored = src.startswith("^")
    pattern = ("^" if anchored else "") + re.escape(src.lstrip("^"))
    new, n = re.subn(pattern, dst.lstrip("^"), key, count=1)
    if n:
      return new
  return key


def torch_to_flax(key: str, rules: KeyRules) -> tuple[str, tuple[str, ...], str]:
  """Maps a PyTorch key to (collection, Flax module path, PyTorch leaf name)."""
  parts = _rename(key, rules.renames).split(".")
  path: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  leaf = parts[-1]
  collection = "batch_stats" if leaf in ("running_mean", "running_var") else "params"
  return collection, tuple(path), leaf


def flax_to_torch(path: tuple[str, ...], rules: KeyRules) -> str:
  """Maps a Flax key path (ending in the leaf) to a PyTorch key."""
  leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean",
          "var": "running_var"}.get(path[-1], path[-1])
  mods = [re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]]
  return _rename(".".join(mods + [leaf]), [(d, s) for s, d in rules.renames])


def _to_flax_leaf(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  if leaf == "weight" and value.ndim == 4:
    return "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == "weight" and value.ndim == 2:
    return "kernel", value.T  # (out, in) -> (in, out)
  if leaf == "weight":
    return "scale", value
  return {"running_mean": "mean", "running_var": "var"}.get(leaf, leaf), value


def load_state_dict(source: Source) -> dict[str, np.ndarray]:
  """Reads a state dict: a mapping, or a .npz / .pt / .pth / .safetensors file.

  Args:
    source: name -> array mapping (numpy or CPU torch tensors), or a path.

  Returns:
    name -> numpy array, with a "model"/"state_dict" wrapper and DataParallel's
    "module." prefix removed.
  """
  if isinstance(source, Mapping):
    raw = dict(source)
  else:
    path = os.fspath(source)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
      with np.load(path) as f:
        raw = {k: f[k] for k in f.files}
    elif ext in (".pt", ".pth", ".bin"):
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(f"Reading {path} needs PyTorch (pip install torch), "
                          "or convert it to .npz / .safetensors elsewhere.") from e
      raw = torch.load(path, map_location="cpu", weights_only=True)
    elif ext == ".safetensors":
      try:
        from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError(f"Reading {path} needs safetensors (pip install safetensors).") from e
      raw = load_file(path)
    else:
      raise ValueError(f"Unknown weight file type {ext!r}: use .npz, .pt, .pth or .safetensors.")
  for wrapper in ("model", "state_dict"):
    if wrapper in raw and isinstance(raw[wrapper], Mapping):
      raw = dict(raw[wrapper])
  out = {}
  for k, v in raw.items():
    v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    out[k[len("module."):] if k.startswith("module.") else k] = v
  return out


def convert(name: str, source: Source, target: Mapping[str, Any], *,
            allow_head_mismatch: bool = False) -> dict:
  """Fills `target`'s variables from a torchvision / timm state dict.

  Args:
    name: a registered model with a converter (`baq.models.get_converter`).
    source: state dict or path (see `load_state_dict`).
    target: the model's variables {"params", "batch_stats"} from `model.init`
      (or `jax.eval_shape` of it, for shapes only); float or quantized.
    allow_head_mismatch: leave a head whose shape differs (other classes)
      at its target value instead of raising.

  Returns:
    A copy of `target` with every leaf the source provides replaced.

  Raises:
    ValueError: listing unused source keys, shape mismatches and unfilled
      target leaves.
  """
  rules = models.get_converter(name)
  state = load_state_dict(source)
  flat = {c: tu.flatten_dict(dict(target.get(c, {}))) for c in ("params", "batch_stats")}
  filled, unused, mismatched = set(), [], []
  for key, value in state.items():
    if key.rsplit(".", 1)[-1] in _SKIPPED:
      continue
    collection, path, leaf = torch_to_flax(key, rules)
    source_shape = value.shape
    leaf, value = _to_flax_leaf(leaf, value)
    full = path + (leaf,)
    if full not in flat[collection]:
      unused.append(key)
      continue
    want = tuple(np.shape(flat[collection][full]))
    if leaf == "pos_embed" and value.shape != want:  # another image or patch size
      prefix = sum((t,) in flat["params"] for t in ("cls_token", "dist_token"))
      grid = int(round((want[1] - prefix)**0.5))
      value = np.asarray(resize_pos_embed(jnp.asarray(value), prefix, (grid, grid)))
    if value.shape != want:
      filled.add((collection, full))  # kept at init, or reported once as a mismatch
      if not (allow_head_mismatch and path[0] in rules.heads):
        mismatched.append(f"{key} {source_shape} -> {'/'.join(full)} needs {want}")
      continue
    flat[collection][full] = jnp.asarray(value, flat[collection][full].dtype)
    filled.add((collection, full))
  unfilled = [f"{c}:{'/'.join(k)}" for c in flat for k in flat[c]
              if (c, k) not in filled and k[-1] not in _QUANT_LEAVES
              and not (allow_head_mismatch and k[0] in rules.heads)]
  if unused or mismatched or unfilled:
    raise ValueError(
        f"Converting {name}: {len(unused)} unused source keys {unused[:8]}, "
        f"{len(mismatched)} shape mismatches {mismatched[:8]}, "
        f"{len(unfilled)} unfilled target leaves {unfilled[:8]}.")
  out = dict(target)
  out.update({c: tu.unflatten_dict(f) for c, f in flat.items() if f})
  return out


def merge(init: Mapping[str, Any], source: Mapping[str, Any]) -> dict:
  """`init` (e.g. a quantized model's) with every leaf that `source` holds.

  Bit-width and range leaves, absent from a float source, stay at init.

  Args:
    init: variables of the model to seed, {"params", "batch_stats", ...}.
    source: variables of the same architecture (e.g. a converted float model).

  Returns:
    The merged variables.

  Raises:
    ValueError: a leaf of `init` is missing from `source` or has another shape.
  """
  out, problems = dict(init), []
  for c in ("params", "batch_stats"):
    if c not in init:
      continue
    fi, fs = tu.flatten_dict(dict(init[c])), tu.flatten_dict(dict(source.get(c, {})))
    for k, v in fi.items():
      if k[-1] in _QUANT_LEAVES:
        continue
      if k not in fs or np.shape(fs[k]) != np.shape(v):
        problems.append(f"{c}:{'/'.join(k)}")
        continue
      fi[k] = jnp.array(fs[k])  # a copy: a training step may donate buffers
    out[c] = tu.unflatten_dict(fi)
  if problems:
    raise ValueError(f"Source lacks (or mis-shapes) {len(problems)} leaves: {problems[:8]}.")
  return out


def to_torch(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Exports Flax variables under torchvision / timm names and layouts.

  Args:
    name: a registered model with a converter.
    variables: {"params", "batch_stats"}; bit-width leaves are left out.

  Returns:
    PyTorch-named numpy state dict (BatchNorm `num_batches_tracked` = 0).
  """
  rules = models.get_converter(name)
  out = {}
  for c in ("params", "batch_stats"):
    for path, v in tu.flatten_dict(dict(variables.get(c, {}))).items():
      if path[-1] in _QUANT_LEAVES:
        continue
      v = np.asarray(v)
      if path[-1] == "kernel":
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
      key = flax_to_torch(path, rules)
      out[key] = v
      if key.endswith("running_mean"):
        out[key[:-len("running_mean")] + "num_batches_tracked"] = np.array(0, np.int64)
  return out
