"""A baq allocation as Qwix quantization rules, and Qwix's PTQ of a float model.

Qwix (google/qwix) quantizes a Flax model by intercepting its ops under
`QuantizationRule`s matched on module paths. `rules` turns each quantized
layer of a deployed baq model into one rule at the layer's bit-width, so
that Qwix's post-training quantization of the same float weights gives the
same integer grid as baq's round-to-nearest deployment:

  * Qwix's symmetric integer types extend the bound to qmax + 0.5 (the step
    is absmax / (2^(b-1) - 0.5)); baq's restricted range uses absmax /
    (2^(b-1) - 1). The rule's calibration "absmax,r" with
    r = (2^(b-1) - 0.5) / (2^(b-1) - 1) makes the two steps equal.

What Qwix supports, and so what `rules` maps (everything else is refused
with the reason; `unsupported` says why for each layer):

  * Dense / DenseGeneral layers (dot_general). Qwix quantizes a
    convolution's weights only together with its input activations at the
    same type, so baq's weight-only convolutions have no rule.
  * per-channel scales: Qwix always quantizes weights per output channel,
    so baq's per-layer (one scale per tensor) units have no rule;
  * one bit-width per layer (a rule gives a module one type): baq's
    per-channel units map when all of a layer's channels share their bits;
  * int2 ... int8, symmetric, `scale_method="absmax"` (Qwix's calibration
    is abs-max times one ratio per rule; mse or learned ranges vary per
    channel).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import jax
import numpy as np

QWIX_BITS = (2, 3, 4, 5, 6, 7, 8)


def qtype(bits: int) -> str:
  """Qwix's name of the signed integer type of `bits` bits."""
  return {4: "int4", 8: "int8"}.get(bits, f"int{bits}")


def calibration(bits: int) -> str:
  """The weight calibration that gives Qwix baq's restricted-range step."""
  half = 2.0 ** (bits - 1)
  return f"absmax,{(half - 0.5) / (half - 1.0)!r}"


def unsupported(rec: dict, *, symmetric: bool, scale_method: str) -> Optional[str]:
  """Why a captured layer (`packed.capture_codes`) has no Qwix rule, or None."""
  bits = sorted(set(np.asarray(rec["bits"]).astype(int).ravel().tolist()))
  channels = np.shape(rec["codes"])[-1]
  if rec.get("op") == "conv":
    return ("a convolution: Qwix quantizes convolution weights only together with their "
            "input activations at the same type, and this layer is weight-only")
  if not symmetric:
    return "asymmetric weights: the mapping is written for symmetric quantization"
  if scale_method != "absmax":
    return (f"scale method {scale_method!r}: Qwix calibrates by abs-max times one ratio "
            "per rule; use scale_method='absmax'")
  if np.size(rec["scale"]) == 1 and channels > 1:
    return "one scale per tensor (per-layer units): Qwix quantizes weights per output channel"
  if len(bits) > 1:
    return f"channels at different bit-widths {bits}: a Qwix rule gives a module one type"
  if bits[0] not in QWIX_BITS:
    return f"{bits[0]} bits: Qwix's integer types are int2 ... int8"
  return None


def rules(captured: dict[str, dict], *, symmetric: bool, scale_method: str) -> list[dict]:
  """One rule (as a dict of QuantizationRule's arguments) per quantized layer.

  Raises:
    ValueError: some layer cannot be expressed; the message lists each with
      its reason (no rules are returned, so nothing partial is written).
  """
  why = {layer: unsupported(rec, symmetric=symmetric, scale_method=scale_method)
         for layer, rec in captured.items()}
  bad = {k: v for k, v in why.items() if v}
  if bad:
    raise ValueError("Qwix cannot express this allocation: " + "; ".join(
        f"{k}: {v}" for k, v in sorted(bad.items())) + ".")
  out = []
  for layer, rec in captured.items():
    b = int(np.max(rec["bits"]))
    out.append(dict(module_path=re.escape(layer), weight_qtype=qtype(b),
                    weight_calibration_method=calibration(b)))
  return out


def write_rules(path: str, rule_args: list[dict]) -> None:
  with open(path, "w") as f:
    json.dump({"format": "baq.qwix_rules", "version": "1", "rules": rule_args}, f, indent=1)


def load_rules(path: str) -> list[Any]:
  """`qwix.QuantizationRule`s from a `write_rules` file."""
  import qwix  # pylint: disable=import-outside-toplevel
  with open(path) as f:
    doc = json.load(f)
  if doc.get("format") != "baq.qwix_rules":
    raise ValueError(f"{path} is not a baq Qwix rules file.")
  return [qwix.QuantizationRule(**r) for r in doc["rules"]]


def ptq_apply(float_model, float_variables: dict, rule_list: list[Any], x) -> jax.Array:
  """Logits of Qwix's PTQ of `float_model` under `rule_list` (eval mode)."""
  import qwix  # pylint: disable=import-outside-toplevel
  from baq.variables import apply_model  # pylint: disable=import-outside-toplevel
  qmodel = qwix.quantize_model(float_model, qwix.PtqProvider(rule_list))
  abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), x[:1]))
  params = qwix.quantize_params(float_variables["params"], abstract["params"])
  return apply_model(qmodel, dict(float_variables, params=params), x)
