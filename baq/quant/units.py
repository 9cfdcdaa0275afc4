"""Bit units: what the bit-width leaves govern, their cost, and the budget.

A *unit* is one bit-width: a whole layer, or one output channel of a layer.
Its cost is the number of weights it governs (`numel`). The average bit-width
is weighted by that count, so a 4.0-bit budget means the quantized weights
take exactly as much memory as a uniform 4-bit model's.

Training keeps bit-widths continuous; deployment needs integers:
`baq.allocation.projection` turns them into integers that meet the budget
*after* rounding, which a soft penalty alone cannot promise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq.quant.inject import BITS_LEAF

Params = Mapping[str, Any]
SCALE_BYTES = 4  # one float32 scale (and, asymmetric, one zero point) per unit


@dataclasses.dataclass(frozen=True)
class LayerUnits:
  """The bit-width leaf of one layer and the kernel it governs.

  Attributes:
    name: the layer's module path, "/"-joined.
    bits_path: key path of the `bits` leaf.
    kernel_path: key path of the kernel.
    count: number of units (1 for a layer, channels for per-channel).
    numel: weights per unit.
  """

  name: str
  bits_path: tuple[str, ...]
  kernel_path: tuple[str, ...]
  count: int
  numel: int


def find_units(params: Params) -> list[LayerUnits]:
  """Every quantized layer of a parameter tree, in a stable (sorted) order."""
  flat = tu.flatten_dict(dict(params))
  layers = []
  for path in sorted(flat):
    if path[-1] != BITS_LEAF:
      continue
    layer = path[:-2]
    kernel_path = layer + ("kernel",)
    if kernel_path not in flat:
      raise ValueError(f"Bit-width leaf {'/'.join(path)} has no kernel beside it.")
    count = int(np.size(flat[path]))
    layers.append(LayerUnits("/".join(layer), path, kernel_path, count,
                             int(np.size(flat[kernel_path])) // count))
  return layers


def unit_numels(layers: list[LayerUnits]) -> np.ndarray:
  """Weights per unit, for all units concatenated in `find_units` order."""
  return np.concatenate([np.full(l.count, l.numel, np.int64) for l in layers]) \
      if layers else np.zeros((0,), np.int64)


def unit_names(layers: list[LayerUnits]) -> list[str]:
  """One name per unit: the layer path, with `[c]` for channel units."""
  names = []
  for l in layers:
    names += [l.name] if l.count == 1 else [f"{l.name}[{c}]" for c in range(l.count)]
  return names


def gather_bits(params: Params, layers: list[LayerUnits]) -> jax.Array:
  """All units' bit-widths as one vector (differentiable)."""
  if not layers:
    return jnp.zeros((0,), jnp.float32)
  flat = tu.flatten_dict(dict(params))
  return jnp.concatenate([jnp.reshape(flat[l.bits_path], (-1,)) for l in layers])


def scatter_bits(params: Params, layers: list[LayerUnits], bits) -> dict:
  """A copy of `params` whose bit-width leaves hold the vector `bits`."""
  flat = dict(tu.flatten_dict(dict(params)))
  offset = 0
  for l in layers:
    old = flat[l.bits_path]
    flat[l.bits_path] = jnp.reshape(
        jnp.asarray(bits[offset:offset + l.count], jnp.float32), jnp.shape(old))
    offset += l.count
  return tu.unflatten_dict(flat)


def average_bits(params: Params, layers: list[LayerUnits]) -> jax.Array:
  """Weight-count-weighted mean bit-width of the quantized weights."""
  if not layers:
    return jnp.float32(32.0)
  numel = jnp.asarray(unit_numels(layers), jnp.float32)
  return jnp.sum(numel * gather_bits(params, layers)) / jnp.sum(numel)


def model_bytes(params: Params, layers: list[LayerUnits], avg_bits=None, *,
                symmetric: bool = True, batch_stats: Any = None) -> Any:
  """Deployed size in bytes.

  Quantized kernels at their bit-widths; one float32 scale per unit, and one
  float32 zero point per unit more when the codes are asymmetric; everything
  else (biases, norms, float layers and, when given, the BatchNorm
  statistics) in float32.

  Args:
    params: the model's parameters.
    layers: its bit-width units.
    avg_bits: the kernels' average bit-width (default: the params' own).
    symmetric: symmetric codes (no zero points).
    batch_stats: the model's BatchNorm statistics, or None.
  """
  flat = tu.flatten_dict(dict(params))
  quantized = {l.kernel_path for l in layers} | {l.bits_path for l in layers}
  float_numel = sum(int(np.size(v)) for p, v in flat.items()
                    if p not in quantized and p[-1] != "log_range")
  float_numel += sum(int(np.size(v)) for v in jax.tree.leaves(batch_stats or {}))
  q_numel = int(unit_numels(layers).sum())
  n_units = sum(l.count for l in layers)
  if avg_bits is None:
    avg_bits = average_bits(params, layers) if layers else 0.0
  per_unit = SCALE_BYTES * (1 if symmetric else 2)
  return 4 * float_numel + per_unit * n_units + q_numel * avg_bits / 8.0


def bits_for_bytes(params: Params, layers: list[LayerUnits], target_bytes: float, *,
                   symmetric: bool = True, batch_stats: Any = None) -> float:
  """The average bit-width at which `model_bytes` (same options) equals `target_bytes`."""
  fixed = model_bytes(params, layers, avg_bits=0.0, symmetric=symmetric,
                      batch_stats=batch_stats)
  q_numel = int(unit_numels(layers).sum())
  if q_numel == 0:
    raise ValueError("The model has no quantized weights; a size budget is meaningless.")
  return float((target_bytes - fixed) * 8.0 / q_numel)


def check_budget(target_bits: float, min_bits: float, max_bits: float) -> None:
  """Refuses an average-bit target no allocation in [min_bits, max_bits] meets."""
  if not np.isfinite(target_bits):
    raise ValueError(f"Target of {target_bits} average bits is not a finite number.")
  if target_bits < min_bits:
    raise ValueError(
        f"Target of {target_bits:.3f} average bits is below min_bits={min_bits}: "
        "no allocation can meet it. Lower min_bits or raise the target.")
  if target_bits > max_bits:
    raise ValueError(
        f"Target of {target_bits:.3f} average bits is above max_bits={max_bits}: "
        "the bound can never be reached. Raise max_bits or lower the target.")
