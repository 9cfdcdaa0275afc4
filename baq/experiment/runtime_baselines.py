"""The runtimes' quantized matmuls as post-training baselines of the main job.

A name of `baq.quant.numerics` in `config.baselines` (llm_int8, nf4, fp4,
dynamic_int8, llama.cpp's q8_0 ... q2_k, beside uniform<B>) is the trained float model with every Dense
layer that `config.quant` quantizes computing as that runtime does
(`QuantSpec.numerics`), with the options of `config.numerics_options[name]`
(the runtime's defaults where not given). Convolutions stay float, as the
runtimes replace Linear layers only. The runtimes are post-training
methods: nothing trains, so the workdir holds nothing of them and `report`
(train.py and eval.py) evaluates them from fp32, even with mode=float.

Their bits, counted as baq's own rows count theirs:
  avg_bits       over the weights `config.quant` quantizes (the kernels of
                 baq's own rows): each Dense weight at the runtime's code bits
                 (`Numeric.storage`: 4 for nf4/fp4, 8 for llm_int8 and
                 dynamic_int8, 4 for q4_k), each float convolution weight at 32.
  size_bytes     the Dense codes plus the runtime's scales and statistics
                 (nf4's float32 absmax per block, llm_int8's per output
                 channel, ...), everything else in float32.
  bits_per_dense_weight  codes plus those statistics per Dense weight
                 (nf4 at blocksize 64: 4.5).
They are not exported: `config.export` writes baq's own quantized methods,
and each runtime stores its own format.
"""

from __future__ import annotations

import dataclasses

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.models import build_model
from baq.quant.inject import QuantConv, QuantDotGeneral, QuantMode, Quantizer
from baq.quant.numerics import NUMERICS
from baq import workdir as wd
from baq.train.evaluate import evaluate_split
from baq.train.modes import quant_rules
from baq.variables import apply_model, as_variables

NOTE = ("{names}: a runtime's quantized matmul (baq.quant.numerics) on every quantized Dense "
        "layer of fp32, no training, convolutions float; avg_bits: Dense codes at the "
        "runtime's bits and float convolutions at 32, over the weights baq quantizes; "
        "size_bytes adds the runtime's scales; ")


def _given(config: ml_collections.ConfigDict) -> dict:
  """`config.numerics_options` as a plain dict (absent in an older workdir's config)."""
  given = config.get("numerics_options") or {}
  return given.to_dict() if hasattr(given, "to_dict") else dict(given)


def options(config: ml_collections.ConfigDict, name: str) -> dict:
  """The options `name` runs with: `config.numerics_options[name]` over the runtime's defaults."""
  return dict(NUMERICS.get(name).options(), **(_given(config).get(name) or {}))


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses, before any work, options of `config.numerics_options` that cannot run.

  Each numeric's own checks judge the values (a traced `dot`, no compute).

  Raises:
    KeyError: an unknown numeric (the message lists the valid ones).
    ValueError: an unknown option (the valid ones listed) or a value out of
      its bound (the option and the bound named).
  """
  given = _given(config)
  for name in sorted(set(given) | set(wd.runtime_baselines(config))):
    numeric = NUMERICS.get(name)
    unknown = sorted(set(given.get(name) or {}) - set(numeric.options()))
    if unknown:
      raise ValueError(f"numerics_options.{name} has unknown options {unknown}. "
                       f"Valid: {', '.join(numeric.options())}.")
    opts = options(config, name)
    x, w = jax.ShapeDtypeStruct((1, 64), jnp.float32), jax.ShapeDtypeStruct((64, 2), jnp.float32)
    try:
      jax.eval_shape(lambda a, b, n=numeric, o=opts: n.dot(a, b, **o), x, w)
    except ValueError as e:
      raise ValueError(f"numerics_options.{name}: {e}") from None


def quantizer(config: ml_collections.ConfigDict, name: str) -> Quantizer:
  """The eval-mode quantizer of runtime baseline `name`.

  `config.quant`'s rules decide which layers are quantized (float_layers and
  rules of None stay float, as for baq's own rows); every quantized layer
  runs the numeric. `ste=True`: the forward is the runtime's, and gradients
  (eval.py --diagnostics) are straight-through, as baq's fake quantization's.
  """
  opts = tuple(sorted(dict(options(config, name), ste=True).items()))
  rules = tuple((pattern, None if spec is None else
                 dataclasses.replace(spec, numerics=name, numerics_options=opts))
                for pattern, spec in quant_rules(config.quant, parametrization="fixed"))
  return Quantizer(rules, mode=QuantMode.EVAL)


def model(config: ml_collections.ConfigDict, name: str, num_classes: int):
  """The config's model with runtime baseline `name` injected (its params are fp32's)."""
  return build_model(config.model.name, num_classes, quantizer(config, name),
                     **config.model.kwargs.to_dict())


def quantized_layers(qmodel, variables, sample) -> dict[str, bool]:
  """layer path -> whether it ran the numeric (Dense) or stayed float (Conv).

  Read from the model itself: the injected ops whose rule quantizes them,
  recorded in one traced forward pass (no compute).
  """
  def quantized(mdl, method):
    del method
    return (isinstance(mdl, (QuantDotGeneral, QuantConv)) and
            mdl.quantizer.spec_for("/".join(mdl.path[:-1])) is not None)

  _, state = jax.eval_shape(lambda v, x: apply_model(
      qmodel, v, x, capture_intermediates=quantized, mutable=["intermediates"]),
      as_variables(variables), sample)
  flat = tu.flatten_dict(state["intermediates"])
  ops = {p[:-1]: p[-2] for p in flat}  # (layer..., op) -> op name
  return {"/".join(p[:-1]): op.startswith(QuantDotGeneral.__name__) for p, op in ops.items()}


def storage(config: ml_collections.ConfigDict, name: str, qmodel, variables,
            sample) -> dict:
  """avg_bits, size_bytes and bits_per_dense_weight of runtime baseline `name`.

  Args:
    config: the experiment config (the numeric's options).
    name: the numeric.
    qmodel: `model(config, name, ...)`.
    variables: its {"params"[, "batch_stats"]} (fp32's).
    sample: one input batch (shapes only).

  Returns:
    The three figures, as the module docstring defines them.
  """
  numeric, opts = NUMERICS.get(name), options(config, name)
  v = as_variables(variables)
  flat = tu.flatten_dict(dict(v["params"]))
  total = sum(int(np.size(x)) for x in flat.values())
  total += sum(int(np.size(x)) for x in jax.tree.leaves(v.get("batch_stats") or {}))
  code = stats = dense = quant = 0.0
  for layer, is_dense in quantized_layers(qmodel, variables, sample).items():
    kernel = np.shape(flat[tuple(layer.split("/")) + ("kernel",)])
    n = int(np.prod(kernel))
    quant += n
    if is_dense:
      bits, extra = numeric.storage(*kernel, **opts)
      code, stats, dense = code + bits * n, stats + extra, dense + n
  avg = (code + 32.0 * (quant - dense)) / quant if quant else 32.0
  return dict(avg_bits=float(avg), size_bytes=float(4 * (total - dense) + (code + stats) / 8),
              bits_per_dense_weight=float((code + stats) / dense) if dense else None)


def entry(config: ml_collections.ConfigDict, name: str, qmodel, variables, split) -> dict:
  """One report row: test metrics of runtime baseline `name`, with its bits and size."""
  m = evaluate_split(qmodel, variables, split, config.eval_batch_size,
                     config.dataset.positive_class)
  sample = jnp.zeros((1,) + split.images.shape[1:], jnp.float32)
  m.update(storage(config, name, qmodel, variables, sample))
  return m


def note(config: ml_collections.ConfigDict) -> str:
  """The report note's words on the runtime baselines ("" without any)."""
  names = wd.runtime_baselines(config)
  return NOTE.format(names=", ".join(names)) if names else ""


def export_note(config: ml_collections.ConfigDict, formats) -> str:
  """Why the runtime baselines are not exported ("" when nothing would be)."""
  names = wd.runtime_baselines(config)
  if not names or not formats:
    return ""
  return (f"[report] {', '.join(names)}: runtime baselines, not exported: config.export "
          f"({','.join(formats)}) writes baq's own quantized methods; each runtime stores "
          "its own format (bitsandbytes', torch's, llama.cpp's GGUF).")
