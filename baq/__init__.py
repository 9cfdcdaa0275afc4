"""baq: fairness-aware differentiable bit allocation in JAX/Flax.

Layers, from the bottom. A module imports its own package and lower layers
only; the packages of one layer are independent of each other
(tests/test_layers.py walks every import and holds this true):

  0  baq.registry, baq.variables,   named registries; a model's variables and
     baq.launch, baq.stats,         apply; the process setup of every entry
     baq.progress                   point; bootstrap, paired tests, McNemar
                                    and multiple-testing corrections; the
                                    long drivers' progress lines
  1  baq.quant                      fake quantization, parametrizations,
                                    injection, numerics, bit units, the GPTQ
                                    solver, the method registry
  2  baq.models, baq.workdir        model families; the one owner of run and
                                    file names in a workdir
  3  baq.data, baq.fairness         datasets; group losses, metrics,
                                    regularizers, stereotype scores
  4  baq.allocation, baq.ptq,       curvature, importance, the exact allocator;
     baq.export                     post-training quantization of whole models
                                    (sequential GPTQ, decoders); packed
                                    safetensors, ONNX, Qwix, GPTQ checkpoints
  5  baq.train                      modes, train state, step, loop, fit,
                                    checkpoints, sharding, evaluation
  6  baq.experiment                 the drivers: the main job (train.py,
                                    eval.py), deployment, runtime baselines,
                                    diagnostics, lanes, sweep, Pareto,
                                    exhaustive allocations
  7  baq.study                      the studies, one subpackage each (bias,
                                    lm, vlm), and paired comparisons
"""

from __future__ import annotations

__version__ = "0.1.0"

LAYERS = (
    ("baq.registry", "baq.variables", "baq.launch", "baq.stats", "baq.progress"),
    ("baq.quant",),
    ("baq.models", "baq.workdir"),
    ("baq.data", "baq.fairness"),
    ("baq.allocation", "baq.ptq", "baq.export"),
    ("baq.train",),
    ("baq.experiment",),
    ("baq.study",),
)


def owner(module: str) -> str | None:
  """The top-level part of baq (an entry of LAYERS) that `module` belongs to."""
  for layer in LAYERS:
    for part in layer:
      if module == part or module.startswith(part + "."):
        return part
  return None


def layer_of(module: str) -> int | None:
  """The layer index of a dotted `baq.*` name (module or imported name); `baq`
  itself is 0 (it holds only this docstring's table)."""
  if module == "baq":
    return 0
  part = owner(module)
  if part is None:
    return None
  return next(i for i, layer in enumerate(LAYERS) if part in layer)
