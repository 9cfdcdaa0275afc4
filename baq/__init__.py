"""baq: fairness-aware differentiable bit allocation in JAX/Flax.

Subpackages: `baq.quant` (fake quantization, injection, bit units, export),
`baq.models`, `baq.data`; modules: `regularizers` (the penalty research API),
`trainer`, `experiment` (the main job), `metrics`, `losses`.
"""

__version__ = "0.1.0"
