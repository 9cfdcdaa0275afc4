"""A finished run as deployed: integer bits at its budget, evaluated and exported.

`deployed_run` turns a method's run into integer bit-widths that meet its
budget; `export_method` evaluates that model, writes the allocation, its plot
and the bit-packed weights, and checks that the packed file reproduces the
evaluated logits. `quantized_entry` is one row of the report.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.allocation import projection
from baq.models import build_model
from baq.export import allocation as alloc_export
from baq.export import packed
from baq.quant import units
from baq.train import workdir as wd
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import evaluate_split, predict_logits
from baq.train.modes import budget_bits, get_mode, selected
from baq.train.sharding import is_primary
from baq.train.trainer import searched_params
from baq.variables import as_variables


def quantized_entry(config: ml_collections.ConfigDict, model, variables, split, layers) -> dict:
  """Test metrics of a quantized model, with its average bits and size."""
  m = evaluate_split(model, variables, split, config.eval_batch_size,
                     config.dataset.positive_class)
  params = as_variables(variables)["params"]
  avg = float(units.average_bits(params, layers))
  m.update(avg_bits=avg, size_bytes=float(units.model_bytes(
      params, layers, avg_bits=avg, symmetric=config.quant.symmetric,
      batch_stats=as_variables(variables).get("batch_stats"))))
  return m


def deployed_run(config: ml_collections.ConfigDict, workdir: str, mode: str,
                 num_classes: int) -> tuple:
  """A method's run as deployed: integer bits meeting its budget.

  Returns:
    (eval-mode model, restored variables, deployed variables, integer bits,
    layers, target average bits).
  """
  spec = get_mode(config, mode)
  model = build_model(config.model.name, num_classes,
                      spec.quantizer.replace(training=False), **config.model.kwargs.to_dict())
  run_vars = restore_variables(wd.path(workdir, wd.method_name(config, mode)))
  params = run_vars["params"]
  layers = units.find_units(params)
  target = budget_bits(config, params, layers, run_vars.get("batch_stats")) if spec.uses_budget else \
      float(units.average_bits(params, layers))
  ints, deployed = projection.deploy(params, layers, target, config.quant.min_bits,
                                 config.quant.max_bits)
  return model, run_vars, dict(run_vars, params=deployed), ints, layers, target


def export_method(config: ml_collections.ConfigDict, workdir: str, mode: str, test) -> dict:
  """Deploys the method's run at integer bits, exports it and evaluates it.

  With one method the export files are WORKDIR/bit_allocation.json (.png) and
  WORKDIR/packed_weights.safetensors; with several, each goes to its run directory.
  Only the primary process writes and checks the files.

  Returns:
    The method's report entry.
  """
  name = wd.method_name(config, mode)
  out_dir = wd.export_dir(workdir, name, len(selected(config)))
  model, run_vars, dvars, _, layers, target = deployed_run(config, workdir, mode,
                                                           test.num_classes)
  deployed = dvars["params"]
  m = quantized_entry(config, model, dvars, test, layers)
  m.update(target_bits=target)
  if not is_primary():
    return m
  record = alloc_export.allocation_record(
      searched_params(wd.path(workdir, name), run_vars["params"], layers), deployed, layers,
      target, symmetric=config.quant.symmetric, batch_stats=run_vars.get("batch_stats"))
  alloc_export.write_allocation(os.path.join(out_dir, wd.ALLOCATION_FILE), record)
  alloc_export.plot_allocation(os.path.join(out_dir, wd.ALLOCATION_PLOT), record)
  sample = jnp.asarray(test.images[:1], jnp.float32)
  captured = packed.capture_codes(model, dvars, sample)
  packed_path = os.path.join(out_dir, wd.PACKED_FILE)
  code_bytes = packed.save_packed(packed_path, captured, config.quant.symmetric, record)
  # The packed file must reproduce the evaluated model; check it on test images.
  kernels = packed.unpack_kernels(packed_path)
  fq_logits = predict_logits(model, dvars, test, config.eval_batch_size)
  dq_logits = predict_logits(packed.reference_model(model),
                             dict(run_vars, params=packed.dequantized_params(deployed, kernels)),
                             test, config.eval_batch_size)
  m.update(avg_bits_continuous=record["avg_bits_continuous"], packed_code_bytes=code_bytes,
           export_max_abs_logit_diff=float(np.max(np.abs(fq_logits - dq_logits))))
  return m
