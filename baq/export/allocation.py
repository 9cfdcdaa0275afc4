"""The exported allocation: per-unit integer and continuous bits, and its plot.

`bit_allocation.json` is the record of `allocation_record`; the safetensors
export (`baq.export.packed`) carries the same record in its metadata.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from baq.quant import units


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
