"""The main job: float model, uniform baselines and the methods, then the table.

`run` (train.py) trains what is missing and resumes what was interrupted, in
the layout of `baq.workdir` (fp32/, uniform<B>/, one directory per
method of `config.mode`, allocation_plan.json), and then `report` (also
eval.py) evaluates every run on the test split, adds the
post-training-quantized uniform figures and the runtime baselines
(`baq.experiment.runtime_baselines`: llm_int8, nf4, ... of `config.baselines`,
computed from fp32), exports each method's integer allocation and packed
weights, prints one table and writes report.json.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq import launch
from baq.allocation import planner
from baq.data import datasets, records
from baq.fairness import metrics
from baq.models import build_model
from baq.quant import units
from baq.quant.inject import QuantMode
from baq.experiment import deploy, lanes, runtime_baselines
from baq import workdir as wd
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import evaluate_split
from baq.train.modes import budget_bits, get_mode, run_steps, selected
from baq.launch import is_primary
from baq.train.state import merge_params
from baq.train.loop import train
from baq.experiment.checks import validate
from baq.variables import apply_model, as_variables


def load_data(config: ml_collections.ConfigDict) -> dict:
  """{"train", "validation", "test"} Splits of `config.dataset`.

  With `dataset.eval_center_crop` the validation and test images are the
  central fraction of each side, resized back (and rounded to uint8), as
  every evaluation and export then sees them: cropped at once in memory,
  or, streamed, on each read (`records.center_cropped`).
  """
  d = config.dataset
  kw = dict(data_dir=d.data_dir, stream=bool(d.get("stream", False)), **d.kwargs.to_dict())
  # A dataset is prepared on first use: by process 0 alone, the others then read it.
  splits = launch.primary_first(
      lambda: {"train": datasets.load(d.name, d.train_split, **kw),
               "validation": datasets.load(d.name, d.val_split, **kw),
               "test": datasets.load(d.name, d.test_split, **kw)}, "baq: dataset prepared")
  crop = d.get("eval_center_crop")
  if crop is not None:
    for k in ("validation", "test"):
      splits[k] = dataclasses.replace(splits[k],
                                      images=records.center_cropped(splits[k].images, crop))
  return splits


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) every run of the experiment, then reports.

  Returns:
    The report dict written to WORKDIR/report.json.
  """
  validate(config)
  os.makedirs(workdir, exist_ok=True)
  if is_primary():
    with open(wd.path(workdir, wd.CONFIG_FILE), "w") as f:
      f.write(config.to_json(indent=1))
  data = load_data(config)
  fp_dir = wd.float_dir(config, workdir)
  if not config.init_checkpoint:
    train(config, fp_dir, mode="float", data=data, steps=config.float_steps,
          lr=config.optim.lr, use_penalties=False, name=wd.FLOAT)
  quantized = [m for m in selected(config) if m != "float"]
  if not quantized and wd.baseline_bits(config) and is_primary():
    print(f"[baq] mode={config.mode} trains no quantized model, so the uniform baselines "
          f"({', '.join(map(wd.uniform_name, wd.baseline_bits(config)))}) are not trained: "
          "they train beside a quantized method", flush=True)
  if quantized:
    float_vars = restore_variables(fp_dir)
    common = dict(data=data, lr=config.optim.finetune_lr, init_variables=float_vars)

    def uniform(b):
      name = wd.uniform_name(b)
      train(config, wd.path(workdir, name), mode="qat", bits=b, steps=config.steps,
            use_penalties=False, name=name, **common)

    def method(mode):
      spec = get_mode(config, mode)
      bits = allocation_plan(config, workdir, float_vars, data) \
          if spec.init_allocation else None
      name = wd.method_name(config, mode)
      train(config, wd.path(workdir, name), mode=mode, steps=run_steps(config, spec),
            name=name, init_bits=bits, **common)

    # Two lanes, both from the float weights alone: the baselines, and the
    # methods (which share the allocation plan, so they stay in one lane).
    lanes.run_lanes([[functools.partial(uniform, b) for b in wd.baseline_bits(config)],
                     [functools.partial(method, m) for m in quantized]],
                    concurrent=lanes.concurrency(config.get("concurrent_runs", lanes.AUTO)))
  return report(config, workdir, data)


def init_quantized(model, split, float_params) -> Any:
  """A quantized model's parameters at init with the float weights merged in."""
  sample = jnp.zeros((1,) + split.images.shape[1:], jnp.float32)
  # Jitted: eagerly, each initializer compiles op by op (seconds per model);
  # the float weights replace the initial ones anyway.
  init = jax.jit(model.init)({"params": jax.random.key(0), "quant": jax.random.key(0)},
                             sample)["params"]
  return merge_params(init, float_params)


def allocation_plan(config: ml_collections.ConfigDict, workdir: str, float_variables: Any,
                    data: dict) -> np.ndarray:
  """The importance allocation at the budget, kept in WORKDIR/allocation_plan.json.

  A saved plan of the same units and budget is reused.

  Args:
    config: the experiment config.
    workdir: the experiment's workdir.
    float_variables: the float model's {"params", "batch_stats"} (or params).
    data: the splits ("train" is calibrated on).

  Returns:
    int64 [units] bit-widths in `units.find_units` order.
  """
  layers, budget = plan_units(config, float_variables, data["train"])
  path = wd.path(workdir, wd.PLAN_FILE)
  if os.path.exists(path) and planner.matches(saved := wd.read_json(path), layers, budget):
    return np.asarray(saved["bits"], np.int64)
  plan = make_plan(config, float_variables, data["train"])
  if is_primary():  # every host allocates the same bits; one writes
    os.makedirs(workdir, exist_ok=True)
    wd.write_json(path, plan)
  return np.asarray(plan["bits"], np.int64)


def plan_units(config: ml_collections.ConfigDict, float_variables: Any, split) -> tuple:
  """(the quantized model's `units.find_units`, the average-bit budget) of `config`."""
  fv = as_variables(float_variables)
  spec = get_mode(config, "fair_static")
  qparams = init_quantized(build_model(config.model.name, split.num_classes, spec.quantizer,
                                       **config.model.kwargs.to_dict()), split, fv["params"])
  layers = units.find_units(qparams)
  return layers, budget_bits(config, qparams, layers, fv.get("batch_stats"))


def make_plan(config: ml_collections.ConfigDict, float_variables: Any, split) -> dict:
  """`planner.plan` of the float model at the config's budget, calibrated on `split`
  (a group-balanced sample of it: `importance.calib_per_group` per group); no I/O."""
  analysis, layers, budget = make_analysis(config, float_variables, split)
  return planner.plan_from(config, analysis, layers, budget)


def make_analysis(config: ml_collections.ConfigDict, float_variables: Any, split) -> tuple:
  """(`planner.analyse_for` of the float model on `split`, its layers, the budget)."""
  fv = as_variables(float_variables)
  layers, budget = plan_units(config, fv, split)
  fmodel = build_model(config.model.name, split.num_classes, None,
                       **config.model.kwargs.to_dict())
  analysis = planner.analyse_for(config, lambda p, x: apply_model(fmodel, dict(fv, params=p), x),
                                 fv["params"], layers,
                                 get_mode(config, "fair_static").quantizer.spec_for, split)
  return analysis, layers, budget


def baseline_runs(config: ml_collections.ConfigDict, workdir: str, num_classes: int,
                  float_vars: dict, split) -> Iterator[tuple]:
  """(name, eval-mode model, variables) of each baseline, in `config.baselines` order.

  A uniform baseline (trained beside a quantized method only) gives its run
  and its PTQ version; a runtime baseline, fp32's weights under that
  runtime's matmul (`runtime_baselines.model`), whatever the mode.
  """
  trained = selected(config) != ["float"]
  for name in wd.baseline_names(config):
    if wd.is_runtime(name):
      yield name, runtime_baselines.model(config, name, num_classes), float_vars
      continue
    if not trained:
      continue
    model = build_model(config.model.name, num_classes,
                        get_mode(config, "qat", wd.parse_uniform(name)).quantizer.replace(
                            mode=QuantMode.EVAL), **config.model.kwargs.to_dict())
    yield name, model, restore_variables(wd.path(workdir, name))
    yield wd.ptq_name(name), model, dict(float_vars,
                                         params=init_quantized(model, split, float_vars["params"]))


def report(config: ml_collections.ConfigDict, workdir: str, data: Optional[dict] = None) -> dict:
  """Evaluates every finished run in `workdir` and writes the report and export.

  Returns:
    {"methods": {name: metrics}, "dataset": ..., "split": ..., ...}.
  """
  check_finished(config, workdir)
  data = data or load_data(config)
  test = data["test"]
  float_vars = restore_variables(wd.float_dir(config, workdir))
  fmodel = build_model(config.model.name, test.num_classes, None, **config.model.kwargs.to_dict())
  fm = evaluate_split(fmodel, float_vars, test, config.eval_batch_size,
                      config.dataset.positive_class)
  fm.update(avg_bits=32.0, size_bytes=float(units.model_bytes(
      float_vars["params"], [], avg_bits=0.0, batch_stats=float_vars.get("batch_stats"))))
  methods = {wd.FLOAT: fm}
  for name, model, variables in baseline_runs(config, workdir, test.num_classes, float_vars,
                                              test):
    methods[name] = (runtime_baselines.entry(config, name, model, variables, test)
                     if wd.is_runtime(name) else deploy.quantized_entry(
                         config, model, variables, test, units.find_units(variables["params"])))
  for mode in selected(config):
    if mode != "float":
      methods[wd.method_name(config, mode)] = deploy.export_method(config, workdir, mode, test)
  out = {"methods": methods, "dataset": config.dataset.name, "split": config.dataset.test_split,
         "group_names": list(test.group_names), "seed": config.seed,
         "note": "fp32: float; uniformB: B-bit QAT fine-tuned from fp32; uniformB_ptq: "
                 "B-bit round-to-nearest of fp32, no training; " +
                 runtime_baselines.note(config) + name_note(config)}
  if is_primary():  # every host evaluates; one writes
    path = wd.path(workdir, wd.REPORT_FILE)
    wd.write_json(path, out)
    print(metrics.format_table(methods, test.group_names), flush=True)
    skipped = runtime_baselines.export_note(
        config, deploy.export_formats(config.get("export", "safetensors")))
    if skipped:
      print(skipped, flush=True)
    print(f"report: {path}", flush=True)
  return out


def check_finished(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to report or export a workdir whose runs have not finished.

  Raises:
    FileNotFoundError: naming the run and its latest step; nothing is written.
  """
  runs = [(wd.float_dir(config, workdir), None)]
  quantized = [m for m in selected(config) if m != "float"]
  for mode in quantized:
    spec = get_mode(config, mode)
    if spec.trains:
      runs.append((wd.path(workdir, wd.method_name(config, mode)), run_steps(config, spec)))
  # Uniform baselines train beside a quantized method; a runtime baseline
  # needs fp32 alone.
  for b in wd.baseline_bits(config) if quantized else ():
    runs.append((wd.path(workdir, wd.uniform_name(b)),
                 run_steps(config, get_mode(config, "qat", b))))
  for run_dir, steps in runs:
    latest = wd.latest_step(run_dir)
    if latest is None or (steps is not None and latest != steps):
      have = "no checkpoint" if latest is None else f"only step {latest} of {steps}"
      raise FileNotFoundError(f"{run_dir} holds {have}: there is no finished run to evaluate "
                              f"or export. Train it first (python train.py "
                              f"--workdir={workdir}); nothing was written.")


def name_note(config: ml_collections.ConfigDict) -> str:
  """What each method of the report is, in words."""
  notes = []
  for mode in selected(config):
    how = ("post-training, at the importance allocation" if not get_mode(config, mode).trains
           else "fine-tuned from fp32")
    notes.append(f"{wd.method_name(config, mode)}: mode {mode}, {how}")
  return "; ".join(notes) + "."
