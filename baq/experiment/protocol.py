r"""The allocation protocol: every arm at equal steps, paired over seeds, chosen on validation.

  python -m baq.experiment.protocol --config=configs/protocol.py:channel_a4 \
    --workdir=/tmp/baq_protocol [--config.seeds="(0,1,2,3,4)"]

For each seed of `config.seeds` it trains (or resumes) in WORKDIR/seed<S>:
  fp32/               the float model; every arm of the seed starts from it
  uniform<B>/         uniform QAT at the integers around each budget, and 8
  b<budget>/<arm>/    each arm of `protocol.arms` (baq.experiment.arms): its
                      candidates' runs, result.json (validation and test
                      metrics, the selected allocation, search and training
                      seconds) and test_correct.npy (the selected run's
                      per-example test correctness)
Equal conditions: every run trains T = `steps + quant.search_steps` steps
with the same penalties (`config.penalties`), optimizer and BatchNorm
handling; BAQ's bit search is part of its T. Every choice (the candidate
an arm keeps) is made on the validation split's worst group; the test split
is read only to report. A finished arm is read back and an interrupted run
resumes, so the command can be stopped and rerun in pieces. Then
`protocol_report` prints the table and the paired tests against
`protocol.reference` and writes WORKDIR/summary.json.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from typing import Sequence

from absl import app
import ml_collections
import numpy as np

from baq import launch, progress
from baq import workdir as wd
from baq.allocation import projection
from baq.experiment import arms as arms_lib, checks, job, lanes, protocol_report
from baq.models import build_model
from baq.quant import units
from baq.quant.inject import QuantMode
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import predict_logits
from baq.train.loop import train
from baq.train.modes import get_mode

UNIFORM_TOP = 8  # uniform QAT at 8 bits: the accuracy an allocation must stay near


def total_steps(config: ml_collections.ConfigDict) -> int:
  """T: every run's training steps (a search's steps included)."""
  return int(config.steps) + int(config.quant.get("search_steps") or 0)


def uniform_bits(budgets: Sequence[float]) -> list[int]:
  """The integers around each budget, and UNIFORM_TOP, ascending."""
  return sorted({int(math.floor(b)) for b in budgets} | {int(math.ceil(b)) for b in budgets}
                | {UNIFORM_TOP})


def arm_names(config: ml_collections.ConfigDict) -> list[str]:
  """`protocol.arms` less "uniform", each checked (an unknown name lists the valid)."""
  names = [a.strip() for a in config.protocol.arms.split(",") if a.strip()]
  for a in names:
    if a != "uniform":
      arms_lib.ARMS.get(a)
  return [a for a in names if a != "uniform"]


# What a seed's float model is trained from: a workdir whose config agrees on
# these (and the seed) holds the same float model, whatever its quantizer.
FLOAT_INPUTS = ("dataset", "model", "float_steps", "optim", "batch_size")


def _float_from(config: ml_collections.ConfigDict, root: str, seed: int, fp_dir: str,
                log=print) -> None:
  """Copies seed's float model from `protocol.float_from` (another protocol
  workdir) into fp_dir, when it is not there yet and that workdir's config
  trains the same float model; refuses, naming the fields, when it does not.
  A seed that workdir has not finished is left to train here (the same model:
  training is deterministic), and `log` says so."""
  source_root = config.protocol.get("float_from") or ""
  if not source_root or wd.latest_step(fp_dir) is not None:
    return
  with open(wd.path(source_root, wd.CONFIG_FILE)) as f:
    theirs = json.load(f)
  ours = json.loads(config.to_json())
  differ = [k for k in FLOAT_INPUTS if ours.get(k) != theirs.get(k)]
  if differ:
    raise ValueError(f"protocol.float_from={source_root!r} trained its float models with other "
                     f"{', '.join(differ)}; it cannot stand in for this config's.")
  source = wd.path(wd.seed_dir(source_root, seed), wd.FLOAT)
  if wd.latest_step(source) != int(config.float_steps):
    log(f"[protocol] seed {seed}: {source} holds no finished float model "
        f"({config.float_steps} steps); training it here")
    return
  # Process 0 copies; the others, after a barrier, find it there.
  launch.primary_first(lambda: os.path.isdir(fp_dir) or shutil.copytree(source, fp_dir),
                       f"baq: seed {seed}'s float model copied")


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses unknown arms, a missing reference and impossible counts before any work."""
  names = arm_names(config)
  if config.protocol.reference not in names:
    raise ValueError(f"protocol.reference={config.protocol.reference!r} is not one of the "
                     f"arms {config.protocol.arms!r}.")
  if config.protocol.get("test", "t") not in protocol_report.TESTS:
    raise ValueError(f"protocol.test={config.protocol.test!r} is not a paired test. "
                     f"Valid: {', '.join(protocol_report.TESTS)}.")
  checks.at_least(config, {"protocol.random_count": 1, "protocol.oracle_limit": 1,
                           "protocol.probe_steps": 0, "protocol.probe_max": 1,
                           "protocol.probe_per_group": 1})


def correctness(config, mode: str, run_dir: str, splits: dict, budget: float | None,
                qat_bits: int | None = None) -> tuple[dict, float]:
  """({split: per-example correctness}, average bits) of a finished run, as deployed."""
  spec = get_mode(config, mode, qat_bits)
  split0 = next(iter(splits.values()))
  model = build_model(config.model.name, split0.num_classes,
                      spec.quantizer.replace(mode=QuantMode.EVAL), **config.model.kwargs.to_dict())
  variables = restore_variables(run_dir)
  layers = units.find_units(variables["params"])
  if spec.uses_budget:
    _, params = projection.deploy(variables["params"], layers, budget, config.quant.min_bits,
                                  config.quant.max_bits)
    variables = dict(variables, params=params)
  out = {k: (predict_logits(model, variables, s, config.eval_batch_size).argmax(-1) == s.labels)
         for k, s in splits.items()}
  return out, float(units.average_bits(variables["params"], layers))


def scores(correct: np.ndarray, split) -> dict:
  """Accuracy, worst-group accuracy and each group's accuracy of a correctness vector."""
  groups = [float(correct[split.groups == g].mean()) for g in range(split.num_groups)
            if (split.groups == g).any()]
  return dict(accuracy=float(correct.mean()), worst_group_accuracy=min(groups),
              group_accuracy=groups)


def _train_run(config, run_dir: str, mode: str, data: dict, float_vars, steps: int,
               seconds: dict, bits=None, qat_bits=None) -> None:
  t0 = time.perf_counter()
  train(config, run_dir, mode=mode, data=data, steps=steps, lr=config.optim.finetune_lr,
        bits=qat_bits, init_bits=bits, init_variables=float_vars, use_penalties=True,
        name=os.path.relpath(run_dir, os.path.dirname(os.path.dirname(run_dir))))
  seconds[run_dir] = time.perf_counter() - t0


def _finish(config, run_dir: str, mode: str, splits: dict, budget, qat_bits=None) -> dict:
  correct, avg_bits = correctness(config, mode, run_dir, splits, budget, qat_bits)
  return dict(avg_bits=avg_bits, correct=correct,
              **{k: scores(c, splits[k]) for k, c in correct.items()})


def _run_key(cand) -> tuple | None:
  """What makes two candidates the same run, or None when a candidate is its own.

  A run at fixed integer bits from the float model for T steps depends on
  nothing else the arm chose (same seed, data order, penalties), so when the
  static plan, the minimax plan, a random draw and an oracle allocation
  coincide, they share one run; training is deterministic, so sharing gives
  what training each again would. Runs from a search's weights, or of fewer
  steps, or BAQ's, are their own.
  """
  if cand.mode != "fair_static_qat" or cand.init_variables is not None or cand.steps is not None:
    return None
  return tuple(int(b) for b in np.asarray(cand.bits).ravel())


def _better(a: dict, b: dict) -> bool:
  """Whether candidate a beats b on validation (worst group, then accuracy)."""
  ka = (a["validation"]["worst_group_accuracy"], a["validation"]["accuracy"])
  kb = (b["validation"]["worst_group_accuracy"], b["validation"]["accuracy"])
  return ka > kb


def _write(path_dir: str, result: dict, correct: np.ndarray) -> None:
  if launch.is_primary():
    os.makedirs(path_dir, exist_ok=True)
    np.save(wd.path(path_dir, wd.ARM_CORRECT_FILE), correct.astype(np.uint8))
    wd.write_json(wd.path(path_dir, wd.ARM_RESULT_FILE), result)


def run_seed(config: ml_collections.ConfigDict, root: str, seed: int, data: dict,
             log=print) -> dict:
  """Every arm of one seed at every budget (finished ones read back): {row: result}."""
  c = config.copy_and_resolve_references()
  c.seed = seed
  T, p = total_steps(c), c.protocol
  budgets, names = [float(b) for b in p.budgets], arm_names(c)
  sdir = wd.seed_dir(root, seed)
  fp_dir = wd.path(sdir, wd.FLOAT)
  _float_from(c, root, seed, fp_dir, log)
  train(c, fp_dir, mode="float", data=data, steps=c.float_steps, lr=c.optim.lr,
        use_penalties=False, name=f"seed{seed}/{wd.FLOAT}")
  float_vars = restore_variables(fp_dir)
  splits = {k: data[k] for k in ("validation", "test")}
  seconds, rows, jobs, pending = {}, {}, [], []
  trained, finished = {}, {}  # (budget, run key) -> run dir; run dir -> its scores
  concurrent = lanes.concurrency(c.get("concurrent_runs", lanes.AUTO))

  for b in (uniform_bits(budgets) if "uniform" in p.arms else []):
    name, rdir = wd.uniform_name(b), wd.path(sdir, wd.uniform_name(b))
    result_file = wd.path(rdir, wd.ARM_RESULT_FILE)
    if os.path.exists(result_file):
      rows[name] = wd.read_json(result_file)
      continue
    jobs.append(functools.partial(_train_run, c, rdir, "qat", data, float_vars, T, seconds,
                                  qat_bits=b))
    pending.append(("uniform", name, None, rdir, b, None))

  analyses = {}  # the seed's analyses, shared by its budgets (and saved in sdir)
  for budget in budgets:
    cb = c.copy_and_resolve_references()
    cb.quant.target_bits, cb.quant.target_bytes = budget, None
    layers, _ = job.plan_units(cb, float_vars, data["train"])
    ctx = arms_lib.Context(cb, data, float_vars, units.unit_numels(layers),
                           tuple(int(x) for x in cb.importance.choices), budget,
                           analysis_dir=sdir, analyses=analyses)
    for arm in names:
      adir = wd.arm_dir(root, seed, budget, arm)
      row = f"{arm}@{budget:g}"
      if os.path.exists(wd.path(adir, wd.ARM_RESULT_FILE)):
        rows[row] = wd.read_json(wd.path(adir, wd.ARM_RESULT_FILE))
        continue
      ctx.scratch = adir
      proposal = arms_lib.ARMS.get(arm)(ctx)
      if proposal is None:
        log(f"[protocol] seed {seed} {row}: skipped (see baq/experiment/arms.py)")
        continue
      dirs = []
      for cand in proposal.candidates:
        rdir, key = wd.path(adir, cand.name), _run_key(cand)
        if key is not None and (budget, key) in trained:
          dirs.append(trained[budget, key])  # the same run another arm asked for: shared
          continue
        if key is not None:
          trained[budget, key] = rdir
        dirs.append(rdir)
        start = float_vars if cand.init_variables is None else cand.init_variables
        jobs.append(functools.partial(_train_run, cb, rdir, cand.mode, data, start,
                                      T if cand.steps is None else cand.steps, seconds,
                                      bits=cand.bits))
      pending.append((arm, row, (proposal, dirs), adir, None, cb))

  # Two lanes fill the two cores one small step leaves idle; results are identical.
  lanes.run_lanes([jobs[0::2], jobs[1::2]] if concurrent > 1 else [jobs], concurrent)

  for arm, row, proposal, adir, qat_bits, cb in pending:
    if arm == "uniform":
      r = _finish(c, adir, "qat", splits, None, qat_bits)
      result = dict(arm="uniform", bits=qat_bits, steps=T, search_seconds=0.0, search_steps=0,
                    train_seconds=seconds.get(adir), avg_bits=r["avg_bits"],
                    validation=r["validation"], test=r["test"])
      _write(adir, result, r["correct"]["test"])
      rows[row] = result
      continue
    proposal, dirs = proposal
    best, tried = None, []
    for cand, rdir in zip(proposal.candidates, dirs):
      if rdir not in finished:
        finished[rdir] = _finish(cb, rdir, cand.mode, splits, cb.quant.target_bits)
      r = dict(finished[rdir], candidate=cand.name, start_bits=np.asarray(cand.bits).tolist())
      tried.append(dict(candidate=cand.name, bits=r["start_bits"], validation=r["validation"],
                        test=r["test"], run=os.path.relpath(rdir, root)))
      if best is None or _better(r, best):
        best = r
    result = dict(arm=arm, budget=cb.quant.target_bits, steps=T, selected=best["candidate"],
                  bits=best["start_bits"], avg_bits=best["avg_bits"],
                  search_seconds=proposal.search_seconds, search_steps=proposal.search_steps,
                  train_seconds=sum(seconds.get(d, 0.0) for d in dirs),
                  candidates=tried, validation=best["validation"], test=best["test"],
                  info=proposal.info)
    _write(adir, result, best["correct"]["test"])
    rows[row] = result
    worst = 100 * result["test"]["worst_group_accuracy"]
    log(f"[protocol] seed {seed} {row}: worst group {worst:.2f}"
        f" (validation {100 * result['validation']['worst_group_accuracy']:.2f}), "
        f"{result['avg_bits']:.3f} bits")
  return rows


def read_seed(config: ml_collections.ConfigDict, root: str, seed: int) -> dict:
  """The rows of one seed that have finished (their result.json), reading nothing else:
  for a table of the seeds done so far while others still train."""
  rows = {}
  for b in (uniform_bits(config.protocol.budgets) if "uniform" in config.protocol.arms else []):
    f = wd.path(wd.seed_dir(root, seed), wd.uniform_name(b), wd.ARM_RESULT_FILE)
    if os.path.exists(f):
      rows[wd.uniform_name(b)] = wd.read_json(f)
  for budget in (float(b) for b in config.protocol.budgets):
    for arm in arm_names(config):
      f = wd.path(wd.arm_dir(root, seed, budget, arm), wd.ARM_RESULT_FILE)
      if os.path.exists(f):
        rows[f"{arm}@{budget:g}"] = wd.read_json(f)
  return rows


def main(argv: Sequence[str]) -> None:
  """Runs every seed, then prints the table and writes WORKDIR/summary.json."""
  config, root = launch.start(argv, check=checks.validate)
  seeds = launch.seeds(config)
  check(config)
  os.makedirs(root, exist_ok=True)
  if launch.is_primary():
    with open(wd.path(root, wd.CONFIG_FILE), "w") as f:
      f.write(config.to_json(indent=1))
  data = job.load_data(config)
  runs, p = {}, progress.Progress("protocol", len(seeds), unit="seed")
  for s in seeds:
    runs[s] = run_seed(config, root, s, data)
    p.done(f"seed {s}")
  if launch.is_primary():
    summary = protocol_report.summarize(config, root, runs, data["test"])
    print("\n" + protocol_report.format_summary(summary))
    wd.write_json(wd.path(root, wd.SUMMARY_FILE), summary)
    print(f"summary: {wd.path(root, wd.SUMMARY_FILE)}")


if __name__ == "__main__":
  launch.define_flags("configs/protocol.py:layer",
                      config_help="A regime of configs/protocol.py (seeds: config.seeds).",
                      workdir_help="Directory of all runs (WORKDIR/seed<S>/...).")
  app.run(main)
