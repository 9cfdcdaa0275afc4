"""baq: fairness-aware differentiable bit allocation in JAX/Flax.

Layers, from the bottom (nothing imports upward):

  baq.registry, baq.variables   named registries; a model's variables and apply
  baq.quant                     fake quantization, parametrizations, injection,
                                bit units and budgets, GPTQ
  baq.models, baq.data          model families and datasets (registries)
  baq.export                    packed safetensors, ONNX (onnxruntime), Qwix rules
  baq.fairness                  group losses, metrics, regularizers
  baq.allocation                curvature, importance, the exact allocator
  baq.train                     modes, train state, step and loop, the main job
  baq.study                     the bias study (python -m baq.study)
"""

__version__ = "0.1.0"
