"""The main job: float model, uniform baselines and the method, then the table.

`run` (train.py) trains what is missing and resumes what was interrupted:
  WORKDIR/fp32        the float model (or `config.init_checkpoint`)
  WORKDIR/uniform<B>  uniform B-bit QAT fine-tuned from it (`config.baselines`)
  WORKDIR/<method>    each method under study (`config.mode`, comma-separated
                      for several: "fair_static,fair_static_qat,baq"), same steps
  WORKDIR/allocation_plan.json  the importance allocation, when a mode uses it
and then `report` (also eval.py) evaluates every run on the test split, adds
the post-training-quantized uniform figures, exports the method's integer
allocation and packed weights, prints one table and writes report.json.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.allocation import importance, planner
from baq.fairness import regularizers
from baq.fairness import metrics as M
from baq.train.checkpoint import restore_variables
from baq.data import datasets
from baq.train.evaluate import apply_model, as_variables, evaluate_split, predict_logits
from baq.models import MODELS, build_model
from baq.train.modes import MODES, get_mode
from baq.quant import export, units as U
from baq.train.sharding import is_primary
from baq.train.trainer import group_loss_weights, searched_params, target_bits, train

FLOAT = "fp32"


def quiet_logging() -> None:
  """Keeps the console to baq's progress lines: libraries log warnings only.

  Called by train.py and eval.py unless --verbosity is given; tfds's progress
  bars go too.
  """
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()
  except ImportError:
    pass


def modes(config: ml_collections.ConfigDict) -> list[str]:
  """The modes of `config.mode` ("fair_static,baq" -> ["fair_static", "baq"])."""
  out = [m.strip() for m in config.mode.split(",") if m.strip()]
  if not out:
    raise ValueError(f"config.mode is empty. Valid modes: {', '.join(MODES.names())}.")
  return out


def method_name(config: ml_collections.ConfigDict, mode: Optional[str] = None) -> str:
  """A method's report name and run directory (the first mode by default)."""
  mode = mode or modes(config)[0]
  if mode == "qat":
    return f"qat{int(config.qat_bits)}"
  return FLOAT if mode == "float" else mode


def baseline_bits(config: ml_collections.ConfigDict) -> list[int]:
  """Bit-widths of `config.baselines` ("uniform8,uniform4" -> [8, 4])."""
  out = []
  for name in filter(None, (s.strip() for s in config.baselines.split(","))):
    if not name.startswith("uniform") or not name[7:].isdigit():
      raise ValueError(f"Unknown baseline {name!r}. Valid: uniform<B>, e.g. uniform8,uniform4.")
    out.append(int(name[7:]))
  return out


def import_extensions(config: ml_collections.ConfigDict) -> None:
  """Imports `config.imports` (comma-separated modules) for their registrations.

  A researcher's own regularizers, models, modes or datasets live in their
  own module, registered with the decorators of baq's registries; naming the
  module here makes them selectable by name, with no change to baq.
  """
  for name in filter(None, (s.strip() for s in config.get("imports", "").split(","))):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f"config.imports names {name!r}, which cannot be imported: {e}. "
                        "Is its directory on PYTHONPATH?") from e


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses a config that cannot run, before anything is trained."""
  import_extensions(config)
  for mode in modes(config):
    MODES.get(mode)
  MODELS.get(config.model.name)
  datasets.DATASETS.get(config.dataset.name)
  for name, entry in config.penalties.to_dict().items():
    regularizers.REGULARIZERS.get(dict(entry).get("kind", name))
  baseline_bits(config)
  if any(get_mode(config, m).uses_budget for m in modes(config)) \
      and config.quant.target_bytes is None:
    try:
      U.check_budget(float(config.quant.target_bits), config.quant.min_bits,
                     config.quant.max_bits)
    except ValueError as e:
      raise ValueError(f"Impossible budget target_bits={config.quant.target_bits}: {e}") from None
  if "importance" in config:
    ic = config.importance
    importance.MEASURES.get(ic.measure)
    importance.REDUCERS.get(ic.reducer)
    bad = [c for c in ic.choices if not config.quant.min_bits <= c <= config.quant.max_bits]
    if bad:
      raise ValueError(f"importance.choices {list(ic.choices)} has {bad} outside "
                       f"[min_bits, max_bits] = [{config.quant.min_bits}, {config.quant.max_bits}].")
    if ic.method not in ("auto", "dp", "milp", "quantile"):
      raise ValueError(f"Unknown importance.method {ic.method!r}. "
                       "Valid: auto, dp, milp, quantile.")
  elif any(get_mode(config, m).init_allocation for m in modes(config)):
    raise ValueError("These modes allocate bits by importance: the config needs an "
                     "`importance` section (see configs/default.py).")
  group_loss_weights(config.get("group_weighting", "none"), np.zeros(1, np.int64), 1)


def load_data(config: ml_collections.ConfigDict) -> dict:
  d = config.dataset
  kw = dict(data_dir=d.data_dir, **d.kwargs.to_dict())
  return {"train": datasets.load(d.name, d.train_split, **kw),
          "validation": datasets.load(d.name, d.val_split, **kw),
          "test": datasets.load(d.name, d.test_split, **kw)}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) every run of the experiment, then reports.

  Returns:
    The report dict written to WORKDIR/report.json.
  """
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  if is_primary():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=1))
  data = load_data(config)
  fp_dir = config.init_checkpoint or os.path.join(workdir, FLOAT)
  if not config.init_checkpoint:
    train(config, fp_dir, mode="float", data=data, steps=config.float_steps,
          lr=config.optim.lr, use_penalties=False, name=FLOAT)
  quantized = [m for m in modes(config) if m != "float"]
  if quantized:
    float_vars = restore_variables(fp_dir)
    for b in baseline_bits(config):
      train(config, os.path.join(workdir, f"uniform{b}"), mode="qat", bits=b, data=data,
            steps=config.steps, lr=config.optim.finetune_lr, init_variables=float_vars,
            use_penalties=False, name=f"uniform{b}")
    for mode in quantized:
      spec = get_mode(config, mode)
      bits = allocation_plan(config, workdir, float_vars, data) \
          if spec.init_allocation else None
      name = method_name(config, mode)
      train(config, os.path.join(workdir, name), mode=mode, data=data,
            steps=config.steps if spec.trains else 0, lr=config.optim.finetune_lr,
            init_variables=float_vars, name=name, init_bits=bits)
  return report(config, workdir, data)


def allocation_plan(config: ml_collections.ConfigDict, workdir: str, float_variables: Any,
                    data: dict) -> np.ndarray:
  """The importance allocation at the budget (WORKDIR/allocation_plan.json).

  `float_variables`: the float model's {"params", "batch_stats"} (or params).
  """
  fv = as_variables(float_variables)
  float_params = fv["params"]
  spec, train_split = get_mode(config, "fair_static"), data["train"]
  kw = config.model.kwargs.to_dict()
  model = build_model(config.model.name, train_split.num_classes, spec.quantizer, **kw)
  qparams = _init_quantized(model, train_split, float_params)
  layers = U.find_units(qparams)
  fmodel = build_model(config.model.name, train_split.num_classes, None, **kw)
  apply_fn = lambda p, x: apply_model(fmodel, dict(fv, params=p), x)
  return planner.plan(config, apply_fn, float_params,
                      layers, spec.quantizer.spec_for, train_split,
                      target_bits(config, qparams, layers), workdir)


def _quantized_entry(config, model, variables, split, layers) -> dict:
  m = evaluate_split(model, variables, split, config.eval_batch_size,
                     config.dataset.positive_class)
  params = as_variables(variables)["params"]
  avg = float(U.average_bits(params, layers))
  m.update(avg_bits=avg, size_bytes=float(U.model_bytes(params, layers, avg_bits=avg)))
  return m


def report(config: ml_collections.ConfigDict, workdir: str, data: Optional[dict] = None) -> dict:
  """Evaluates every finished run in `workdir` and writes the report and export.

  Returns:
    {"methods": {name: metrics}, "dataset": ..., "split": ...}.
  """
  data = data or load_data(config)
  test = data["test"]
  fp_dir = config.init_checkpoint or os.path.join(workdir, FLOAT)
  float_vars = restore_variables(fp_dir)
  float_params = float_vars["params"]
  fmodel = build_model(config.model.name, test.num_classes, None, **config.model.kwargs.to_dict())
  methods = {}
  fm = evaluate_split(fmodel, float_vars, test, config.eval_batch_size,
                      config.dataset.positive_class)
  fm.update(avg_bits=32.0, size_bytes=float(U.model_bytes(float_params, [], avg_bits=0.0)))
  methods[FLOAT] = fm
  for b in baseline_bits(config) if modes(config) != ["float"] else []:
    spec = get_mode(config, "qat", b)
    model = build_model(config.model.name, test.num_classes,
                        spec.quantizer.replace(training=False), **config.model.kwargs.to_dict())
    ptq = _init_quantized(model, test, float_params)
    layers = U.find_units(ptq)
    methods[f"uniform{b}"] = _quantized_entry(
        config, model, restore_variables(os.path.join(workdir, f"uniform{b}")), test, layers)
    methods[f"uniform{b}_ptq"] = _quantized_entry(config, model, dict(float_vars, params=ptq),
                                                  test, layers)
  for mode in modes(config):
    if mode != "float":
      methods[method_name(config, mode)] = _export_method(
          config, workdir, mode, method_name(config, mode), test)
  out = {"methods": methods, "dataset": config.dataset.name, "split": config.dataset.test_split,
         "group_names": list(test.group_names), "seed": config.seed,
         "note": "fp32: float; uniformB: B-bit QAT fine-tuned from fp32; uniformB_ptq: "
                 "B-bit round-to-nearest of fp32, no training; " + name_note(config)}
  if is_primary():  # every host evaluates; one writes
    with open(os.path.join(workdir, "report.json"), "w") as f:
      json.dump(out, f, indent=1)
    print(M.format_table(methods, test.group_names), flush=True)
    print(f"report: {os.path.join(workdir, 'report.json')}", flush=True)
  return out


def name_note(config) -> str:
  notes = []
  for mode in modes(config):
    how = ("post-training, at the importance allocation" if not get_mode(config, mode).trains
           else "fine-tuned from fp32")
    notes.append(f"{method_name(config, mode)}: mode {mode}, {how}")
  return "; ".join(notes) + "."


def _init_quantized(model, split, float_params) -> Any:
  from baq.train.trainer import merge_params  # pylint: disable=import-outside-toplevel
  sample = jnp.zeros((1,) + split.images.shape[1:], jnp.float32)
  init = model.init({"params": jax.random.key(0), "quant": jax.random.key(0)}, sample)["params"]
  return merge_params(init, float_params)


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
  run_vars = restore_variables(os.path.join(workdir, method_name(config, mode)))
  params = run_vars["params"]
  layers = U.find_units(params)
  target = target_bits(config, params, layers) if spec.uses_budget else \
      float(U.average_bits(params, layers))
  ints, deployed = export.deploy(params, layers, target, config.quant.min_bits,
                                 config.quant.max_bits)
  return model, run_vars, dict(run_vars, params=deployed), ints, layers, target


def _export_method(config, workdir: str, mode: str, name: str, test) -> dict:
  """Deploys the method's run at integer bits, exports it and evaluates it.

  With one method the export files are WORKDIR/bit_allocation.json (.png) and
  WORKDIR/packed_weights.npz; with several, each goes to its run directory.
  Only the primary process writes and checks the files.
  """
  run_dir = os.path.join(workdir, name)
  out_dir = workdir if len(modes(config)) == 1 else run_dir
  model, run_vars, dvars, _, layers, target = deployed_run(config, workdir, mode,
                                                           test.num_classes)
  deployed = dvars["params"]
  m = _quantized_entry(config, model, dvars, test, layers)
  m.update(target_bits=target)
  if not is_primary():
    return m
  record = export.allocation_record(searched_params(run_dir, run_vars["params"], layers),
                                    deployed, layers, target)
  export.write_allocation(out_dir, record)
  export.plot_allocation(os.path.join(out_dir, "bit_allocation.png"), record)
  sample = jnp.asarray(test.images[:1], jnp.float32)
  captured = export.capture_codes(model, dict(run_vars, params=deployed), sample)
  code_bytes = export.save_packed(os.path.join(out_dir, "packed_weights.npz"), captured,
                                  config.quant.symmetric)
  # The packed file must reproduce the evaluated model; check it on test images.
  kernels = export.unpack_kernels(os.path.join(out_dir, "packed_weights.npz"))
  fq_logits = predict_logits(model, dict(run_vars, params=deployed), test, config.eval_batch_size)
  dq_logits = predict_logits(export.reference_model(model),
                             dict(run_vars, params=export.dequantized_params(deployed, kernels)),
                             test, config.eval_batch_size)
  m.update(avg_bits_continuous=record["avg_bits_continuous"], packed_code_bytes=code_bytes,
           export_max_abs_logit_diff=float(np.max(np.abs(fq_logits - dq_logits))))
  return m


def _tuples(tree):
  """JSON lists back to the tuples a config holds (hashable model options)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def evaluate_workdir(workdir: str, config: Optional[ml_collections.ConfigDict] = None) -> dict:
  """eval.py's entry point: `report` with the config the workdir was trained with."""
  return report(workdir_config(workdir, config), workdir)


def workdir_config(workdir: str, config: Optional[ml_collections.ConfigDict] = None
                   ) -> ml_collections.ConfigDict:
  """`config`, or the one WORKDIR/config.json was trained with; validated."""
  if config is None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: is {workdir} a train.py workdir? "
                              "Pass --config to evaluate with an explicit config.")
    with open(path) as f:
      config = ml_collections.ConfigDict(_tuples(json.load(f)))
  validate(config)
  return config
