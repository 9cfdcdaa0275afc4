"""Export: integer bit allocation, packed integer weights and their plot.

One path serves `train.py` and `eval.py`:
  1. `deploy` projects the continuous bit-widths onto integers that meet the
     budget after rounding and writes them into the parameters;
  2. `capture_codes` runs the deployed quantized model once with
     `capture=True`, so the integer codes come from the very quantizer that
     produced the evaluated logits;
  3. `pack` stores each layer's codes at its own bit-width (b bits per weight,
     channels grouped by bit-width) with its scales and zero points;
  4. `unpack_kernels` + `dequantized_params` rebuild float kernels that, put
     in the float model, reproduce the fake-quantized model's logits.
"""

from __future__ import annotations

import json
from typing import Any

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq.variables import apply_model
from baq.quant import units
from baq.quant.inject import BITS_LEAF, EXPORT_COLLECTION, RANGE_LEAF


def reference_model(model):
  """The model that runs exported weights: `dequantized_params` go in as
  they are, activations are quantized as the deployed model does."""
  return model.clone(quant=model.quant.replace(training=False, weights=False))


def capture_codes(model, variables: Any, sample: jax.Array) -> dict[str, dict]:
  """Layer name -> {codes, scale, zero_point, bits} of a deployed model.

  Args:
    model: the quantized model; it is re-cloned with capture on, eval mode.
    variables: deployed params (integer bit-widths), or {"params",
      "batch_stats"} for a model with BatchNorm.
    sample: any input batch (only its shape matters for weights).
  """
  m = model.clone(quant=model.quant.replace(training=False, capture=True))
  _, state = apply_model(m, variables, sample, mutable=[EXPORT_COLLECTION])
  flat = tu.flatten_dict(state[EXPORT_COLLECTION])
  return {"/".join(k[:-2]): jax.device_get(v) for k, v in _group(flat).items()}


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


def save_packed(path: str, captured: dict[str, dict], symmetric: bool) -> int:
  """Writes every layer's packed codes, scales and zero points to one .npz.

  Returns:
    bytes of packed integer codes (excluding scales and container overhead).
  """
  arrays, code_bytes = {}, 0
  for layer, rec in captured.items():
    bits = np.asarray(rec["bits"], np.int64)
    for k, v in pack(np.asarray(rec["codes"]), bits, symmetric).items():
      arrays[f"{layer}::{k}"] = v
      code_bytes += v.nbytes if k.endswith("_data") else 0
    arrays[f"{layer}::scale"] = np.asarray(rec["scale"], np.float32)
    arrays[f"{layer}::zero_point"] = np.asarray(rec["zero_point"], np.float32)
  arrays["__symmetric__"] = np.asarray(symmetric)
  np.savez_compressed(path, **arrays)
  return code_bytes


def unpack_kernels(path: str) -> dict[str, np.ndarray]:
  """Layer name -> dequantized float kernel, from a `save_packed` file."""
  z = np.load(path)
  symmetric = bool(z["__symmetric__"])
  layers: dict[str, dict] = {}
  for key in z.files:
    if "::" in key:
      layer, field = key.split("::")
      layers.setdefault(layer, {})[field] = z[key]
  out = {}
  for layer, rec in layers.items():
    codes = unpack(rec, symmetric).astype(np.float32)
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


def allocation_record(params_cont: Any, params_int: Any, layers, target_bits: float,
                      **size_options) -> dict:
  """The `bit_allocation.json` content: per-unit integer and continuous bits.

  `size_options` (symmetric, batch_stats) go to `units.model_bytes`.
  """
  cont = np.asarray(units.gather_bits(params_cont, layers), np.float64)
  ints = np.asarray(units.gather_bits(params_int, layers)).round().astype(int)
  numel = units.unit_numels(layers)
  rows = [dict(name=n, numel=int(k), bits=int(b), bits_continuous=float(c))
           for n, k, b, c in zip(units.unit_names(layers), numel, ints, cont)]
  per_layer = []
  off = 0
  for l in layers:
    sl = slice(off, off + l.count)
    per_layer.append(dict(name=l.name, numel=int(l.count * l.numel), units=l.count,
                          avg_bits=float(np.mean(ints[sl])),
                          avg_bits_continuous=float(np.mean(cont[sl]))))
    off += l.count
  avg = float((numel * ints).sum() / numel.sum())
  return dict(avg_bits=avg, target_bits=float(target_bits),
              avg_bits_continuous=float((numel * cont).sum() / numel.sum()),
              quantized_weights=int(numel.sum()),
              total_size_bytes=float(units.model_bytes(params_int, layers, avg_bits=avg,
                                                         **size_options)),
              layers=per_layer, units=rows)


def write_allocation(path: str, record: dict) -> str:
  """Writes an `allocation_record` as JSON to `path` and returns the path."""
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  return path


def plot_allocation(path: str, record: dict) -> None:
  """Bits per layer (integer bars, continuous markers, channel spread) as PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  names = [l["name"] for l in record["layers"]]
  x = np.arange(len(names))
  fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(names) + 2), 3.6))
  ax.bar(x, [l["avg_bits"] for l in record["layers"]], color="#4c72b0",
         label="deployed (integer, mean over units)")
  ax.plot(x, [l["avg_bits_continuous"] for l in record["layers"]], "o", color="#dd8452",
          label="learned (continuous)")
  by_layer: dict[str, list[int]] = {}
  for u in record["units"]:
    by_layer.setdefault(u["name"].split("[")[0], []).append(u["bits"])
  for i, n in enumerate(names):
    b = np.asarray(by_layer.get(n, []))
    ax.scatter(np.full(b.shape, i) + np.linspace(-0.3, 0.3, len(b)), b, s=3,
               color="k", alpha=0.3)
  ax.axhline(record["target_bits"], ls="--", color="grey", label="budget")
  ax.set_xticks(x, names, rotation=45, ha="right")
  ax.set_ylabel("bits")
  ax.set_title(f"Bit allocation: {record['avg_bits']:.2f} average bits")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
