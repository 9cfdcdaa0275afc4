"""A finished run as deployed: integer bits at its budget, evaluated and exported.

`deployed_run` turns a method's run into integer bit-widths that meet its
budget; `export_method` evaluates that model, writes the allocation and its
plot, and then each export format of `EXPORTERS` (`config.export`, or
eval.py --export): `safetensors` (the bit-packed codes, checked to reproduce
the evaluated logits), `onnx` (a graph onnxruntime runs, checked on the
test split) and `qwix` (Qwix rules, checked by Qwix's PTQ of the float
weights on the test split). A writer writes its file whole or not at all.
`quantized_entry` is one row of the report.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.allocation import projection
from baq.data.pipeline import MEAN_RGB, STD_RGB, eval_batches
from baq.fairness import metrics
from baq.models import build_model
from baq.export import allocation as alloc_export
from baq.export import packed
from baq.quant import units
from baq.quant.inject import QuantMode
from baq import workdir as wd
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import evaluate_split, predict_logits
from baq.train.modes import budget_bits, get_mode, selected
from baq.launch import is_primary
from baq.train.loop import searched_params
from baq.registry import Registry
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
                      spec.quantizer.replace(mode=QuantMode.EVAL),
                      **config.model.kwargs.to_dict())
  run_vars = restore_variables(wd.path(workdir, wd.method_name(config, mode)))
  params = run_vars["params"]
  layers = units.find_units(params)
  target = budget_bits(config, params, layers, run_vars.get("batch_stats")) if spec.uses_budget else \
      float(units.average_bits(params, layers))
  ints, deployed = projection.deploy(params, layers, target, config.quant.min_bits,
                                 config.quant.max_bits)
  return model, run_vars, dict(run_vars, params=deployed), ints, layers, target


@dataclasses.dataclass
class Deployed:
  """What a format writer gets: a method's deployed model and its evaluation."""
  config: ml_collections.ConfigDict
  model: Any  # the eval-mode quantized model
  variables: dict  # deployed {"params", "batch_stats"}
  captured: dict  # packed.capture_codes: each layer's codes, scale, zero point
  record: dict  # the allocation record (bit_allocation.json)
  test: Any  # the test split
  logits: np.ndarray  # the deployed model's test logits
  out_dir: str


EXPORTERS: Registry[Callable[[Deployed], dict]] = Registry("export format")


def export_formats(spec: str) -> list[str]:
  """The formats of a comma-separated list, each checked (KeyError lists the valid)."""
  names = [f.strip() for f in str(spec or "").split(",") if f.strip()]
  for n in names:
    EXPORTERS.get(n)
  return names


def _atomic(path: str, write: Callable[[str], Any]) -> Any:
  """`write(tmp)` then renames tmp to `path`: a failed export leaves no file."""
  tmp = path + ".partial"
  try:
    out = write(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return out
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _agreement(d: Deployed, logits: np.ndarray, prefix: str) -> dict:
  """How a runtime's logits compare with the deployed model's on the test split."""
  def group_metrics(lg):
    return metrics.classification_metrics(lg.argmax(-1), d.test.labels, d.test.groups,
                                          d.test.num_groups, d.config.dataset.positive_class)
  got, want = group_metrics(logits), group_metrics(d.logits)
  return {f"{prefix}_max_abs_logit_diff": float(np.max(np.abs(logits - d.logits))),
          f"{prefix}_prediction_agreement": float(np.mean(logits.argmax(-1) ==
                                                          d.logits.argmax(-1))),
          f"{prefix}_accuracy": got["accuracy"],
          f"{prefix}_worst_group_accuracy": got["worst_group_accuracy"],
          f"{prefix}_group_accuracy_matches": got["group_accuracy"] == want["group_accuracy"]}


@EXPORTERS.register("safetensors")
def _safetensors(d: Deployed) -> dict:
  """packed_weights.safetensors; its dequantized kernels must give the logits."""
  path = os.path.join(d.out_dir, wd.PACKED_FILE)
  code_bytes = _atomic(path, lambda tmp: packed.save_packed(
      tmp, d.captured, d.config.quant.symmetric, d.record))
  kernels = packed.unpack_kernels(path)
  dq = predict_logits(packed.reference_model(d.model), dict(
      d.variables, params=packed.dequantized_params(d.variables["params"], kernels)),
      d.test, d.config.eval_batch_size)
  return dict(packed_code_bytes=code_bytes, packed_file_bytes=os.path.getsize(path),
              export_max_abs_logit_diff=float(np.max(np.abs(d.logits - dq))))


@EXPORTERS.register("onnx")
def _onnx(d: Deployed) -> dict:
  """model.onnx (uint8 images in, logits out), run by onnxruntime on the test split."""
  from baq.export import onnx as onnx_export  # pylint: disable=import-outside-toplevel
  graph = onnx_export.to_onnx(d.model, d.variables, d.captured, d.test.images[:1],
                              normalize=(MEAN_RGB, STD_RGB), metadata={"allocation": d.record})
  path = os.path.join(d.out_dir, wd.ONNX_FILE)
  _atomic(path, lambda tmp: open(tmp, "wb").write(graph.SerializeToString()))
  logits = onnx_export.run(onnx_export.session(path), d.test.images, d.config.eval_batch_size)
  return dict(onnx_file_bytes=os.path.getsize(path), **_agreement(d, logits, "onnx"))


@EXPORTERS.register("qwix")
def _qwix(d: Deployed) -> dict:
  """qwix_rules.json; Qwix's PTQ of the float weights under it, on the test split."""
  from baq.export import qwix as qwix_export  # pylint: disable=import-outside-toplevel
  rule_args = qwix_export.rules(d.captured, symmetric=d.config.quant.symmetric,
                                scale_method=d.config.quant.scale_method)
  path = os.path.join(d.out_dir, wd.QWIX_FILE)
  _atomic(path, lambda tmp: qwix_export.write_rules(tmp, rule_args))
  fmodel = build_model(d.config.model.name, d.test.num_classes, None,
                       **d.config.model.kwargs.to_dict())
  fvars = dict(d.variables, params=packed.dequantized_params(d.variables["params"], {}))
  rule_list = qwix_export.load_rules(path)
  logits = np.concatenate([np.asarray(qwix_export.ptq_apply(
      fmodel, fvars, rule_list, jnp.asarray(batch["image"])))[batch["mask"] > 0]
      for batch in eval_batches(d.test, d.config.eval_batch_size)])
  return dict(qwix_rules=len(rule_args), **_agreement(d, logits, "qwix"))


def export_method(config: ml_collections.ConfigDict, workdir: str, mode: str, test,
                  formats: Optional[Sequence[str]] = None) -> dict:
  """Deploys the method's run at integer bits, evaluates it and exports it.

  With one method the export files are WORKDIR/bit_allocation.json (.png) and
  one file per format (packed_weights.safetensors, model.onnx, ...); with
  several, each goes to its run directory. Only the primary process writes
  and checks the files.

  Args:
    formats: names in `EXPORTERS`; default `config.export`.

  Returns:
    The method's report entry (with each format's check).
  """
  formats = export_formats(config.get("export", "safetensors") if formats is None
                           else ",".join(formats))
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
  d = Deployed(config, model, dvars, packed.capture_codes(model, dvars, sample), record, test,
               predict_logits(model, dvars, test, config.eval_batch_size), out_dir)
  m.update(avg_bits_continuous=record["avg_bits_continuous"])
  for f in formats:
    m.update(EXPORTERS.get(f)(d))
  return m
