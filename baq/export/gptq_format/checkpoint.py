"""GPTQ-format checkpoint folders: model.safetensors, quantize_config.json, config.json.

Per-module bits live in GPTQModel's `dynamic` overrides (see the package
docstring); writes are atomic (a temporary sibling folder renamed onto the
target), and every check runs before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Any, Mapping, Optional

import numpy as np

from baq.export.gptq_format.packing import (WEIGHTS_FILE, _REQUIRED, _check_bits,
                                             _check_packed, _encode_zeros, _unpack_cols,
                                             _v1_offset, unpack_layer)

QUANT_CONFIG_FILE, CONFIG_FILE = "quantize_config.json", "config.json"

def dynamic_overrides(layer_bits: Mapping[str, int], default_bits: int,
                      layer_group_size: Optional[Mapping[str, int]] = None,
                      default_group_size: Optional[int] = None) -> dict[str, dict]:
  """GPTQModel `dynamic` entries for the layers that differ from the defaults.

  Args:
    layer_bits: HF module name -> bits.
    default_bits: the config's `bits`.
    layer_group_size, default_group_size: likewise for group sizes (optional).

  Returns:
    {"+:<escaped name>$": {"bits": b[, "group_size": g]}}, one exact-name key
    per differing layer ({} when none differ).
  """
  out = {}
  for name, b in layer_bits.items():
    ov = {} if _check_bits(b, f"layer {name}: ") == default_bits else {"bits": int(b)}
    gs = (layer_group_size or {}).get(name, default_group_size)
    if gs != default_group_size:
      ov["group_size"] = int(gs)
    if ov:
      out["+:" + re.escape(name) + "$"] = ov
  return out


def _resolve(qcfg: Mapping[str, Any], module: str) -> Optional[dict[str, Any]]:
  """A module's {bits, group_size, desc_act, sym} under `dynamic`; None if
  a "-:" key excludes it."""
  base = {k: qcfg[k] for k in ("bits", "group_size", "desc_act", "sym")}
  dynamic = qcfg.get("dynamic") or {}
  for pat in sorted(dynamic, key=lambda k: not k.startswith("-")):  # stable: "-" first
    if pat.startswith("-:"):
      if re.match(pat[2:], module):
        return None
    elif re.match(pat.removeprefix("+:"), module):
      return {**base, **{k: v for k, v in dynamic[pat].items() if k in base}}
  return base


def quantize_config(*, bits: int, group_size: int, desc_act: bool, sym: bool,
                    checkpoint_format: str = "gptq", dynamic: Optional[dict] = None,
                    true_sequential: bool = True, lm_head: bool = False) -> dict[str, Any]:
  """The quantize_config.json record (AutoGPTQ's and GPTQModel's field names)."""
  _v1_offset(checkpoint_format)  # validates it
  qcfg = {"bits": _check_bits(bits), "group_size": int(group_size), "desc_act": bool(desc_act),
          "sym": bool(sym), "true_sequential": bool(true_sequential), "lm_head": bool(lm_head),
          "quant_method": "gptq", "checkpoint_format": checkpoint_format,
          "pack_dtype": "int32", "meta": {"quantizer": ["baq"]}}
  if dynamic:  # GPTQModel drops an empty `dynamic`
    qcfg["dynamic"] = {k: dict(v) for k, v in dynamic.items()}
  return qcfg


def _layer_arrays(name: str, p: Mapping[str, np.ndarray], qcfg: Mapping[str, Any]) -> dict:
  """One layer's file entries, validated against the config, qzeros re-encoded."""
  r = _resolve(qcfg, name)
  if r is None:
    raise ValueError(f"layer {name} is quantized but `dynamic` excludes it (\"-:\").")
  bits = _check_bits(r["bits"], f"layer {name}: ")
  d_in, d_out, n = _check_packed(name, p, bits, r["group_size"])
  in_order = np.arange(d_in) // (d_in // n)
  g_idx = np.asarray(p.get("g_idx", in_order), np.int32)
  if not r["desc_act"] and not np.array_equal(g_idx, in_order):
    raise ValueError(f"layer {name} has an act-order g_idx but desc_act=False.")
  if r["sym"] and np.any(_unpack_cols(p["qzeros"], bits, d_out) != 2 ** (bits - 1)):
    raise ValueError(f"layer {name}: sym=True needs every zero point = {2 ** (bits - 1)}.")
  out = {f"{name}.qweight": np.ascontiguousarray(p["qweight"], np.int32),
         f"{name}.scales": np.asarray(p["scales"], np.float16), f"{name}.g_idx": g_idx}
  out[f"{name}.qzeros"] = _encode_zeros(name, p["qzeros"], bits, qcfg["checkpoint_format"])
  if p.get("bias") is not None:
    out[f"{name}.bias"] = np.asarray(p["bias"], np.float16)  # AutoGPTQ keeps bias in half
  return out


def write_checkpoint(folder: str, layers: Mapping[str, Mapping[str, np.ndarray]],
                     tensors: Mapping[str, np.ndarray], hf_config: Mapping[str, Any], *,
                     bits: int, group_size: int, desc_act: bool, sym: bool,
                     checkpoint_format: str = "gptq", dynamic: Optional[dict] = None,
                     true_sequential: bool = True) -> dict[str, Any]:
  """Writes a GPTQ checkpoint folder that AutoGPTQ, GPTQModel and transformers load.

  Everything is validated and packed in memory, then written to a temporary
  sibling folder that is renamed onto `folder` (absent or empty): on any
  error nothing is left behind.

  Args:
    folder: the checkpoint folder to create.
    layers: HF module name -> `pack_layer` dict (qzeros "gptq_v2"), plus an
      optional "bias".
    tensors: unquantized tensors by HF name (embeddings, norms, lm_head).
    hf_config: the model's config.json dict; `quantization_config` is added.
    bits, group_size, desc_act, sym, true_sequential: the config's defaults.
    checkpoint_format: "gptq" (v1, the default) or "gptq_v2".
    dynamic: per-module overrides (`dynamic_overrides`), GPTQModel syntax.

  Returns:
    the quantize_config record written.
  """
  qcfg = quantize_config(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym,
                         checkpoint_format=checkpoint_format, dynamic=dynamic,
                         true_sequential=true_sequential,
                         lm_head=any(n.rsplit(".", 1)[-1] == "lm_head" for n in layers))
  arrays = {}
  for name, p in layers.items():
    arrays.update(_layer_arrays(name, p, qcfg))
  for key, t in tensors.items():
    if key in arrays:
      raise ValueError(f"tensor {key} collides with a quantized layer's entry.")
    arrays[key] = np.ascontiguousarray(t)
  files = {QUANT_CONFIG_FILE: qcfg, CONFIG_FILE: dict(hf_config, quantization_config=qcfg)}
  _atomic_write(folder, arrays, files)
  return qcfg


def _atomic_write(folder: str, arrays: dict, json_files: dict) -> None:
  from baq.export.canonical import save_file  # pylint: disable=import-outside-toplevel
  folder = os.path.abspath(folder)
  if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
    raise FileExistsError(f"{folder} exists and is not an empty folder.")
  parent, base = os.path.split(folder)
  os.makedirs(parent, exist_ok=True)
  # os.mkdir honours the umask (tempfile.mkdtemp would leave the folder 0700).
  tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex[:12]}")
  os.mkdir(tmp)
  try:
    # transformers refuses safetensors files whose metadata lacks format "pt".
    save_file(arrays, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    for fname, obj in json_files.items():
      with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, folder)  # POSIX rename may replace an empty directory
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read_quant_config(folder: str) -> dict[str, Any]:
  """quantize_config.json, else config.json's quantization_config (as GPTQModel)."""
  path, config = os.path.join(folder, QUANT_CONFIG_FILE), os.path.join(folder, CONFIG_FILE)
  qcfg = None
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      qcfg = json.load(f)
  elif os.path.exists(config):
    with open(config, encoding="utf-8") as f:
      qcfg = json.load(f).get("quantization_config")
  if qcfg is None:
    raise FileNotFoundError(f"{path} is missing (nor has {config} a quantization_config).")
  # Older files omit these; the defaults are AutoGPTQ's and GPTQModel's loaders'.
  for key, default in (("checkpoint_format", "gptq"), ("group_size", -1), ("sym", True),
                       ("desc_act", False)):
    qcfg.setdefault(key, default)
  if qcfg.get("quant_method", "gptq") != "gptq":
    raise ValueError(f"{folder}: quant_method {qcfg['quant_method']!r} is not GPTQ.")
  return qcfg


def read_checkpoint(folder: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a GPTQ checkpoint folder's quantized layers, dequantized.

  Args:
    folder: holds model.safetensors and quantize_config.json (or a
      config.json with a quantization_config).

  Returns:
    ({module: float32 weight [d_in, d_out]}, quantize_config), each module at
    the bits and group size `dynamic` gives it.
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  qcfg, weights, path = _read_quant_config(folder), {}, os.path.join(folder, WEIGHTS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing (sharded checkpoints are not read).")
  with safe_open(path, framework="numpy") as f:
    keys = set(f.keys())
    for module in sorted(k[:-len(".qweight")] for k in keys if k.endswith(".qweight")):
      r = _resolve(qcfg, module)
      if r is None:
        raise ValueError(f"{folder}: layer {module} has a qweight but `dynamic` excludes it.")
      bits, gs = _check_bits(r["bits"], f"layer {module}: "), r["group_size"]
      p = {n: f.get_tensor(k) for n in _REQUIRED + ("g_idx",) if (k := f"{module}.{n}") in keys}
      _check_packed(module, p, bits, gs)
      weights[module] = unpack_layer(p, bits, gs, qcfg["checkpoint_format"])
  return weights, qcfg
