"""The one owner of a workdir's layout: run names, file names and checkpoints.

A train.py workdir holds

  WORKDIR/config.json             the config it was trained with
  WORKDIR/fp32/                   the float run (or `config.init_checkpoint`)
  WORKDIR/uniform<B>/             uniform B-bit QAT, one per `config.baselines`
                                  (a runtime baseline of `config.baselines`,
                                  e.g. nf4, has no directory: it trains nothing)
  WORKDIR/<method>/               each method of `config.mode`
  WORKDIR/allocation_plan.json    the importance allocation, when a mode uses it
  WORKDIR/report.json             the final table
  WORKDIR/bit_allocation.json, bit_allocation.png, packed_weights.safetensors,
  WORKDIR/model.onnx, qwix_rules.json
                                  the export (in the method's run directory
                                  when the workdir has several methods)

and every run directory holds `checkpoints/`, `state_signature.json`,
`metrics.jsonl` and, for bit-training runs, `searched_bits.json`.

A bias study root (`python -m baq.study.bias`) holds ROOT/config.json,
ROOT/study.json, ROOT/accuracy_vs_bits.png, ROOT/pareto.png and one
directory per cell, ROOT/<setting>_s<S>/ (`cell_name`), with
predictions.npz, metrics.json and, for a cell that trains, run/. A seed sweep
root (`python -m baq.experiment.sweep`) holds one train.py workdir per seed,
ROOT/seed<S>/, and one per further BAQ budget, ROOT/seed<S>_b<B>/.

Experiment, diagnostics, the bias study and the seed sweep ask this module
for these names; none spells them itself.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from baq.quant import methods

FLOAT = "fp32"
PTQ_SUFFIX = "_ptq"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
PLAN_FILE = "allocation_plan.json"
ALLOCATION_FILE = "bit_allocation.json"
ALLOCATION_PLOT = "bit_allocation.png"
PACKED_FILE = "packed_weights.safetensors"
ONNX_FILE = "model.onnx"
QWIX_FILE = "qwix_rules.json"
DIAGNOSTICS_FILE = "diagnostics.json"
DIAGNOSTICS_PLOT = "diagnostics.png"
IMPORTANCE_PLOT = "bits_vs_importance.png"
PARETO_PLOT = "pareto.png"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SEARCHED_BITS_FILE = "searched_bits.json"
CHECKPOINT_DIR = "checkpoints"
SIGNATURE_FILE = "state_signature.json"
UNIFORM = "uniform"
# The bias study's root and cells.
STUDY_FILE = "study.json"
STUDY_ACCURACY_PLOT = "accuracy_vs_bits.png"
STUDY_PARETO_PLOT = "pareto.png"
PREDICTIONS_FILE = "predictions.npz"
CELL_METRICS_FILE = "metrics.json"
CELL_RUN = "run"
# The language-model and CLIP studies' workdirs: WORKDIR/seed<S>/ per seed.
SUMMARY_FILE = "summary.json"
VERDICTS_PLOT = "verdicts.png"
STUDY_DATA_DIR = "data"  # the LM study's generated corpus
RESULTS_DIR = "results"  # one JSON per setting of a seed
ANALYSIS_DIR = "analysis"  # the LM study's layer analyses of a seed, one file per key
SEED_REPORT_FILE = "report.json"
ARM_RESULT_FILE = "result.json"  # the allocation protocol: one arm of a seed and budget
ARM_CORRECT_FILE = "test_correct.npy"  # its selected run's test correctness


def result_path(seed_dir: str, setting: str) -> str:
  """A study setting's results file: SEED_DIR/results/<setting>.json (":" -> "_")."""
  return path(seed_dir, RESULTS_DIR, setting.replace(":", "_") + ".json")


def analysis_path(seed_dir: str, digest: str) -> str:
  """The LM study's memoised layer analysis: SEED_DIR/analysis/<digest of its inputs>.npz."""
  return path(seed_dir, ANALYSIS_DIR, f"{digest}.npz")


def uniform_name(bits: float) -> str:
  """The run name of uniform `bits`-bit QAT ("uniform4")."""
  return f"{UNIFORM}{bits:g}"


def ptq_name(run: str) -> str:
  """The report name of `run`'s round-to-nearest version ("uniform4_ptq")."""
  return run + PTQ_SUFFIX


def parse_uniform(name: str) -> int:
  """The bit-width of a uniform baseline's name ("uniform8" -> 8).

  Raises:
    ValueError: `name` is not uniform<B>; the message lists every valid baseline.
  """
  if not name.startswith(UNIFORM) or not name[len(UNIFORM):].isdigit():
    raise ValueError(f"Unknown baseline {name!r}. Valid: uniform<B> (e.g. uniform8, "
                     f"uniform4) or a runtime's numerics: {', '.join(methods.RUNTIMES.names())}.")
  return int(name[len(UNIFORM):])


def is_runtime(name: str) -> bool:
  """Whether a baseline name is a method of kind "numerics" (`baq.quant.methods`: a
  runtime's numerics), not uniform<B> (the main job's spelling of qat@B)."""
  return name in methods.RUNTIMES


def baseline_names(config: ml_collections.ConfigDict) -> list[str]:
  """The names of `config.baselines`, in order, each checked.

  Raises:
    ValueError: a name is neither uniform<B> nor a registered numeric.
  """
  names = [s.strip() for s in config.baselines.split(",") if s.strip()]
  for n in names:
    if not is_runtime(n):
      parse_uniform(n)
  return names


def baseline_bits(config: ml_collections.ConfigDict) -> list[int]:
  """Bit-widths of the uniform baselines ("uniform8,nf4,uniform4" -> [8, 4])."""
  return [parse_uniform(n) for n in baseline_names(config) if not is_runtime(n)]


def runtime_baselines(config: ml_collections.ConfigDict) -> list[str]:
  """The runtime baselines of `config.baselines` ("uniform8,nf4,llm_int8" -> [nf4, llm_int8])."""
  return [n for n in baseline_names(config) if is_runtime(n)]


def method_name(config: ml_collections.ConfigDict, mode: str) -> str:
  """A method's report name and run directory name."""
  if mode == "qat":
    return f"qat{int(config.qat_bits)}"
  return FLOAT if mode == "float" else mode


def path(workdir: str, *names: str) -> str:
  """WORKDIR/<names...>."""
  return os.path.join(workdir, *names)


def float_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the float run lives: `config.init_checkpoint` or WORKDIR/fp32."""
  return config.init_checkpoint or path(workdir, FLOAT)


def export_dir(workdir: str, name: str, num_methods: int) -> str:
  """Where a method's export goes: the workdir itself when it is the only method."""
  return workdir if num_methods == 1 else path(workdir, name)


def latest_step(run_dir: str) -> Optional[int]:
  """The step of the newest checkpoint in a run directory, None when it has none."""
  d = path(run_dir, CHECKPOINT_DIR)
  steps = [int(x) for x in os.listdir(d) if x.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=None)


def finished(run_dir: str, steps: int) -> bool:
  """Whether a run directory holds the checkpoint of its last step."""
  return latest_step(run_dir) == steps


def has_checkpoints(run_dir: str) -> bool:
  return latest_step(run_dir) is not None


def write_json(file: str, obj: Any, indent: Optional[int] = 1) -> None:
  """Writes `obj` as JSON (callers decide whether this process writes)."""
  with open(file, "w") as f:
    json.dump(obj, f, indent=indent)


def jsonable(obj: Any) -> Any:
  """`obj` with numpy and jax arrays and scalars turned into lists and Python numbers."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
    arr = np.asarray(obj)
    return arr.item() if arr.ndim == 0 else jsonable(arr.tolist())
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    return obj.item()
  return obj


def read_json(file: str) -> Any:
  with open(file) as f:
    return json.load(f)


def cell_name(setting: str, seed: int) -> str:
  """A bias study cell's directory name: `setting` at one seed ("gptq_w4_s0")."""
  return f"{setting}_s{seed}"


def seed_dir(root: str, seed: int) -> str:
  """The seed sweep's train.py workdir of one seed: ROOT/seed<S>."""
  return path(root, f"seed{seed}")


def budget_dir(root: str, seed: int, bits: float) -> str:
  """The seed sweep's workdir of BAQ at a further budget: ROOT/seed<S>_b<B>."""
  return path(root, f"seed{seed}_b{bits:g}")


def variant_dir(root: str, seed: int, bits: float, variant: str) -> str:
  """The Pareto benchmark's workdir of one budget and variant: ROOT/seed<S>_b<B>_<variant>."""
  return path(root, f"seed{seed}_b{bits:g}_{variant}")


def arm_dir(root: str, seed: int, bits: float, arm: str) -> str:
  """The allocation protocol's directory of one arm: ROOT/seed<S>/b<B>/<arm>."""
  return path(seed_dir(root, seed), f"b{bits:g}", arm)

