"""The packed export: integer codes at each unit's bit-width, in safetensors.

One path serves `train.py` and `eval.py`:
  1. `deploy` projects the continuous bit-widths onto integers that meet the
     budget after rounding and writes them into the parameters;
  2. `capture_codes` runs the deployed quantized model once in
     `QuantMode.CONVERT`, so the integer codes come from the very quantizer
     that produced the evaluated logits;
  3. `pack` stores each layer's codes at its own bit-width (b bits per weight,
     channels grouped by bit-width) and `save_packed` writes them, with their
     scales, zero points and the allocation, to one safetensors file (schema
     in its docstring; `read_packed` reads it);
  4. `unpack_kernels` + `dequantized_params` rebuild float kernels that, put
     in the float model, reproduce the fake-quantized model's logits.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq.variables import apply_model
from baq.quant.inject import BITS_LEAF, EXPORT_COLLECTION, RANGE_LEAF, QuantMode


def reference_model(model):
  """The model that runs exported weights: `dequantized_params` go in as
  they are, activations are quantized as the deployed model does."""
  return model.clone(quant=model.quant.replace(mode=QuantMode.SERVE))


def capture_codes(model, variables: Any, sample: jax.Array) -> dict[str, dict]:
  """Layer name -> {codes, scale, zero_point, bits, op} of a deployed model.

  `op` is "conv" or "dot_general", the operation the kernel feeds.

  Args:
    model: the quantized model; it is re-cloned with capture on, eval mode.
    variables: deployed params (integer bit-widths), or {"params",
      "batch_stats"} for a model with BatchNorm.
    sample: any input batch (only its shape matters for weights).
  """
  m = model.clone(quant=model.quant.replace(mode=QuantMode.CONVERT))
  # Jitted, as evaluation is: eagerly, every op of every layer's scale search
  # compiled on its own (5 s of the main job's report on 2 cores).
  _, state = jax.jit(lambda v, x: apply_model(m, v, x, mutable=[EXPORT_COLLECTION]))(
      variables, sample)
  flat = tu.flatten_dict(state[EXPORT_COLLECTION])
  return {"/".join(k[:-2]): dict(jax.device_get(v), op=_op_kind(k[-2]))
          for k, v in _group(flat).items()}


def _op_kind(module_name: str) -> str:
  """"conv" or "dot_general": which quantized op a layer's kernel feeds."""
  return "conv" if module_name.startswith("QuantConv") else "dot_general"


def _group(flat: dict) -> dict:
  out = {}
  for k, v in flat.items():  # k = (*layer, op, "weight", field)
    out.setdefault(k[:-1], {})[k[-1]] = v
  return out


def _offset(bits: np.ndarray, symmetric: bool) -> np.ndarray:
  return (2 ** (bits - 1) - 1) if symmetric else np.zeros_like(bits)


def pack(codes: np.ndarray, bits: np.ndarray, symmetric: bool) -> dict[str, np.ndarray]:
  """Packs integer codes (channel axis last) at their channels' bit-widths.

  Returns:
    dict with, per distinct bit-width b, `b{b}_data` (uint8 bytes),
    `b{b}_channels` (which channels), plus `shape` and `bits`.
  """
  c = codes.shape[-1]
  rows = np.moveaxis(codes, -1, 0).reshape(c, -1)
  per_ch = np.broadcast_to(np.asarray(bits, np.int64), (c,))
  u = (np.rint(rows).astype(np.int64) + _offset(per_ch, symmetric)[:, None])
  out = {"shape": np.asarray(codes.shape), "bits": per_ch.copy()}
  for b in np.unique(per_ch):
    idx = np.nonzero(per_ch == b)[0]
    vals = u[idx]
    assert vals.min() >= 0 and vals.max() < 2**b, "code outside its bit-width"
    bitplanes = (vals[..., None] >> np.arange(b)) & 1
    out[f"b{b}_data"] = np.packbits(bitplanes.astype(np.uint8).ravel())
    out[f"b{b}_channels"] = idx
  return out


def unpack(packed: dict[str, np.ndarray], symmetric: bool) -> np.ndarray:
  """Inverse of `pack`: the integer codes, in the original shape."""
  shape = tuple(int(s) for s in packed["shape"])
  per_ch = packed["bits"]
  c, m = shape[-1], int(np.prod(shape[:-1]))
  rows = np.zeros((c, m), np.int64)
  for b in np.unique(per_ch):
    idx = packed[f"b{b}_channels"]
    n = len(idx) * m * b
    planes = np.unpackbits(packed[f"b{b}_data"])[:n].reshape(len(idx), m, b)
    rows[idx] = (planes.astype(np.int64) << np.arange(b)).sum(-1)
  rows -= _offset(per_ch, symmetric)[:, None]
  return np.moveaxis(rows.reshape((c,) + shape[:-1]), 0, -1)


FORMAT = "baq.packed"
FORMAT_VERSION = "1"


def save_packed(path: str, captured: dict[str, dict], symmetric: bool,
                allocation: Optional[dict] = None) -> int:
  """Writes every layer's packed codes, scales and zero points to a safetensors file.

  The schema (version 1). For each quantized layer L (its module path, e.g.
  `Conv_0` or `block1/conv/Conv_0`), with C output channels (the kernel's
  last axis) and M weights per channel:
    `L::shape`        int64 [ndim], the kernel's shape;
    `L::bits`         int64 [C], each output channel's bit-width;
    `L::b{b}_channels` int64, the channels stored at b bits, ascending;
    `L::b{b}_data`    uint8, those channels' codes, channel after channel,
                      each channel's M codes in row-major order of the other
                      axes, each code as b bits, least significant first,
                      the bit stream packed by `numpy.packbits` (most
                      significant bit of each byte first) and zero-padded;
                      a stored value is the code plus 2^(b-1) - 1 when
                      symmetric, the code itself otherwise;
    `L::scale`, `L::zero_point` float32, broadcastable to the kernel
                      (one per tensor or one per output channel);
  and the kernel is `(code - zero_point) * scale`. The file's metadata holds
  `format` ("baq.packed"), `version`, `symmetric` ("true"/"false") and, when
  given, `allocation`: the `bit_allocation.json` record as JSON.

  Returns:
    bytes of packed integer codes (excluding scales and container overhead).
  """
  from baq.export.canonical import save_file  # pylint: disable=import-outside-toplevel
  arrays, code_bytes = {}, 0
  for layer, rec in captured.items():
    bits = np.asarray(rec["bits"], np.int64)
    for k, v in pack(np.asarray(rec["codes"]), bits, symmetric).items():
      arrays[f"{layer}::{k}"] = np.ascontiguousarray(v)
      code_bytes += v.nbytes if k.endswith("_data") else 0
    arrays[f"{layer}::scale"] = np.asarray(rec["scale"], np.float32)
    arrays[f"{layer}::zero_point"] = np.asarray(rec["zero_point"], np.float32)
  meta = {"format": FORMAT, "version": FORMAT_VERSION, "symmetric": str(bool(symmetric)).lower()}
  if allocation is not None:
    meta["allocation"] = json.dumps(allocation)
  save_file(arrays, path, metadata=meta)
  return code_bytes


def read_packed(path: str) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
  """Reads a `save_packed` file: (layer -> {field: array}, metadata).

  The metadata's `symmetric` is a bool and `allocation` (if present) a dict.
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(path, framework="numpy") as f:
    meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path} is not a baq packed export (format {meta.get('format')!r}, "
                       f"expected {FORMAT!r}).")
    layers: dict[str, dict] = {}
    for key in f.keys():
      layer, field = key.split("::")
      layers.setdefault(layer, {})[field] = f.get_tensor(key)
  meta["symmetric"] = meta["symmetric"] == "true"
  if "allocation" in meta:
    meta["allocation"] = json.loads(meta["allocation"])
  return layers, meta


def unpack_kernels(path: str) -> dict[str, np.ndarray]:
  """Layer name -> dequantized float kernel, from a `save_packed` file."""
  layers, meta = read_packed(path)
  out = {}
  for layer, rec in layers.items():
    codes = unpack(rec, meta["symmetric"]).astype(np.float32)
    out[layer] = (codes - rec["zero_point"]) * rec["scale"]
  return out


def dequantized_params(float_params: Any, kernels: dict[str, np.ndarray]) -> Any:
  """Float-model params whose quantized kernels are replaced by `kernels`.

  `float_params` may be a quantized model's params: its bit-width and range
  leaves are dropped, so the result fits the float model (quantizer None).
  """
  flat = {k: v for k, v in tu.flatten_dict(dict(float_params)).items()
          if k[-1] not in (BITS_LEAF, RANGE_LEAF)}
  for layer, k in kernels.items():
    path = tuple(layer.split("/")) + ("kernel",)
    if path not in flat or np.shape(flat[path]) != k.shape:
      raise ValueError(f"Exported layer {layer} does not match the model ({path}).")
    flat[path] = jnp.asarray(k, flat[path].dtype)
  return tu.unflatten_dict(flat)


