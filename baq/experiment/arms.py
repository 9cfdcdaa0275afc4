"""The protocol's arms: each an allocation signal feeding the exact solver, or a control.

An arm sees one seed's float model at one budget (`Context`) and proposes
candidates (`Proposal`): integer allocations to train at (mode
`fair_static_qat`), or a mode that searches its own bits while it trains
(`baq`). The protocol trains every candidate the same total steps and keeps
the best on validation, so an arm of several candidates (the random
control, the oracle) is an arm that searched by training. What an arm reads
to decide is its own affair, but never the test split.

  static    the shipped importance allocation (config.importance: Hutchinson
            Hessian on a train calibration sample, groups reduced by `max`,
            exact knapsack), trained the total steps: the equal-steps static
            control every other arm is paired against
  minimax   the same Hessian sensitivity, groups kept apart: the exact
            minimax knapsack (min over allocations of the worst group's sum)
  measured  measured sensitivity on the validation split: each unit alone
            quantized at each choice, every group's loss increase
            (importance.measure "loss"), then the exact minimax knapsack
  probed    measured sensitivity after short QAT (`baq.train.probe`): each unit
            (or cluster of channels alike in the static plan's importance) at
            each choice with the others at the
            highest, `protocol.probe_steps` QAT steps, BatchNorm
            recalibrated, every group's validation loss; the exact minimax
            knapsack on it (the probes' steps are search cost, like an analysis)
  baq       BAQ: bits and weights trained jointly from the static plan for
            `quant.search_steps`, projected, then `steps` more at them
  bilevel   BAQ as a search phase (`baq.train.bilevel`): from the static plan,
            `quant.search_steps` steps with the weights on the training split
            and the bits on the validation split's (group-balanced) CVaR
            loss; the learned bits solved exactly at the budget; then the
            remaining `steps` from the search's weights at those integers
  random    `protocol.random_count` random budget-filling allocations, each
            trained the total steps; the best on validation
  oracle    every budget-filling allocation (when there are at most
            `protocol.oracle_limit`), each trained; the best on validation

A new arm is one function registered in ARMS.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from baq.allocation import landscape, minimax, planner
from baq.experiment import job
from baq.train import bilevel, probe
from baq.registry import Registry


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One run an arm asks for.

  Attributes:
    name: the run's directory under the arm's.
    mode: "fair_static_qat" (trains the weights at `bits`) or "baq".
    bits: the integer allocation to train at (or BAQ's start), `units` order.
  """

  name: str
  mode: str
  bits: np.ndarray
  steps: Optional[int] = None  # None: the protocol's T; less when a search ran first
  init_variables: Any = None  # None: the float model's


@dataclasses.dataclass
class Proposal:
  """What an arm decided, and what deciding cost.

  Attributes:
    candidates: the runs to train; the protocol keeps the best on validation.
    search_seconds: wall time of the decision itself (statistics, solver).
    search_steps: training steps the arm's search takes inside its runs
      (BAQ's bit search); they count in the equal total.
    info: what to record (e.g. the plan's group totals).
  """

  candidates: list
  search_seconds: float
  search_steps: int = 0
  info: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
  """One seed's float model at one budget.

  Attributes:
    config: the protocol config with `seed` and `quant.target_bits` set.
    data: {"train", "validation", "test"} splits.
    float_vars: the float model's variables.
    numel: weights per unit.
    choices: the candidate bit-widths.
    budget: the average-bit budget.
    scratch: a directory where an arm may keep what its search found (read
      back on a rerun), or None.
    analysis_dir: a directory where `plan`'s analyses are kept (the seed's:
      they do not depend on the budget), read back by every budget and rerun
      instead of computed again, or None.
    analyses: the memo of analyses, shared by a seed's budgets.
  """

  config: ml_collections.ConfigDict
  data: dict
  float_vars: Any
  numel: np.ndarray
  choices: tuple
  budget: float
  scratch: Optional[str] = None
  analysis_dir: Optional[str] = None
  analyses: dict = dataclasses.field(default_factory=dict)

  def plan(self, split: str = "train", **importance) -> tuple[dict, float]:
    """(The plan with `config.importance` fields changed, its seconds).

    The analysis (the statistics an importance measure reads) is memoised
    per split and everything else it is computed from but the budget and
    the solver (`_analysis_key`), so arms that differ only in reducer or
    solver, and every budget of a seed, share it; with `analysis_dir` it is
    also saved and read back by later commands. Each arm's seconds count
    the analysis (as long as it took when computed) and its own solve.
    """
    c = self.config.copy_and_resolve_references()
    c.importance.update(importance)
    akey = _analysis_key(c, split)
    path = self.analysis_dir and os.path.join(self.analysis_dir, f"analysis_{akey}.npz")
    if akey not in self.analyses and path and os.path.exists(path):
      self.analyses[akey] = _read_analysis(path)
    t0 = time.perf_counter()
    if akey not in self.analyses:
      analysis, _, _ = job.make_analysis(c, self.float_vars, self.data[split])
      self.analyses[akey] = (analysis, time.perf_counter() - t0)
      if path and jax.process_index() == 0:  # one writer, as for every protocol file
        _write_analysis(path, *self.analyses[akey])
      t0 = time.perf_counter()
    analysis, analysed = self.analyses[akey]
    plan = planner.plan_from(c, analysis, self.layers, self.budget)
    return plan, analysed + time.perf_counter() - t0

  @functools.cached_property
  def layers(self) -> list:
    """The quantized model's units (what an analysis is read against), built once."""
    return job.plan_units(self.config, self.float_vars, self.data["train"])[0]


# Config fields an analysis does not depend on: the budget, the solver, the protocol.
_NOT_ANALYSED = (("quant", "target_bits"), ("quant", "target_bytes"), ("importance", "method"),
                 ("importance", "reducer"), ("importance", "reducer_kwargs"), ("protocol",),
                 ("seeds",))


def _analysis_key(config: ml_collections.ConfigDict, split: str) -> str:
  """A digest of what a seed's analysis on `split` is computed from: the whole
  config (the seed, model, data, quantizer, importance settings) but the fields
  of _NOT_ANALYSED."""
  c = json.loads(config.to_json())
  for path in _NOT_ANALYSED:
    parent = c
    for k in path[:-1]:
      parent = parent.get(k, {})
    parent.pop(path[-1], None)
  text = json.dumps(dict(config=c, split=split), sort_keys=True)
  return f"{split}_{c['importance']['measure']}_{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def _write_analysis(path: str, analysis: planner.Analysis, seconds: float) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fields = {f.name: np.asarray(getattr(analysis, f.name)) for f in dataclasses.fields(analysis)}
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, seconds=np.float64(seconds), **fields)
  os.replace(tmp, path)


def _read_analysis(path: str) -> tuple[planner.Analysis, float]:
  with np.load(path, allow_pickle=False) as f:
    return planner.Analysis(
        units=[str(u) for u in f["units"]], numel=f["numel"],
        choices=tuple(int(x) for x in f["choices"]), importance=f["importance"],
        sensitivity=f["sensitivity"], group_counts=f["group_counts"],
        measure=str(f["measure"])), float(f["seconds"])


ARMS: Registry[Callable[[Context], Proposal]] = Registry("protocol arm")


def _planned(ctx: Context, name: str, split: str = "train", **importance) -> Proposal:
  plan, seconds = ctx.plan(split, **importance)
  bits = np.asarray(plan["bits"], np.int64)
  return Proposal([Candidate(name, "fair_static_qat", bits)], seconds,
                  info=dict(group_totals=plan["group_totals"], measure=plan["measure"],
                            method=plan["method"], calibration=split))


@ARMS.register("static")
def _static(ctx: Context) -> Proposal:
  return _planned(ctx, "static")


@ARMS.register("minimax")
def _minimax(ctx: Context) -> Proposal:
  return _planned(ctx, "minimax", method="minimax")


@ARMS.register("measured")
def _measured(ctx: Context) -> Proposal:
  return _planned(ctx, "measured", "validation", measure="loss", method="minimax")


@ARMS.register("probed")
def _probed(ctx: Context) -> Proposal:
  p = ctx.config.protocol
  score, planned = None, 0.0
  if len(ctx.numel) > int(p.probe_max):
    # Channels are clustered by the static plan's importance (its analysis is
    # memoised and counted here too), so that a cluster holds channels alike.
    static, planned = ctx.plan()
    score = np.asarray(static["importance"], np.float64)
  analysis, seconds = probe.measure(ctx.config, ctx.data, ctx.float_vars,
                                    steps=int(p.probe_steps), choices=ctx.choices,
                                    max_probes=int(p.probe_max),
                                    per_group=int(p.probe_per_group), heldout="validation",
                                    score=score)
  seconds += planned
  t0 = time.perf_counter()
  bits = np.asarray(planner.allocate(analysis, ctx.budget, method="minimax"), np.int64)
  totals = minimax.group_totals(analysis.sensitivity, bits, analysis.choices)
  return Proposal([Candidate("probed", "fair_static_qat", bits)],
                  seconds + time.perf_counter() - t0,
                  info=dict(group_totals=np.asarray(totals).tolist(), measure="probed",
                            method="minimax", calibration="validation",
                            probe_steps=int(p.probe_steps)))


@ARMS.register("baq")
def _baq(ctx: Context) -> Proposal:
  plan, seconds = ctx.plan()
  return Proposal([Candidate("baq", "baq", np.asarray(plan["bits"], np.int64))], seconds,
                  search_steps=int(ctx.config.quant.search_steps or 0))


@ARMS.register("bilevel")
def _bilevel(ctx: Context) -> Proposal:
  plan, seconds = ctx.plan()
  search_steps = int(ctx.config.quant.search_steps or 0)
  if search_steps <= 0:
    raise ValueError("The bilevel arm needs quant.search_steps > 0 (its search's steps).")
  found = bilevel.search(ctx.config, ctx.data, ctx.float_vars, steps=search_steps,
                         init_bits=np.asarray(plan["bits"], np.int64), heldout="validation",
                         path=ctx.scratch and f"{ctx.scratch}/bilevel_search.msgpack")
  total = int(ctx.config.steps) + search_steps
  return Proposal([Candidate("bilevel", "fair_static_qat", found["bits"],
                             steps=total - search_steps, init_variables=found["variables"])],
                  seconds + found["seconds"], search_steps=search_steps,
                  info=dict(learned_bits=found["learned"].tolist()))


@ARMS.register("random")
def _random(ctx: Context) -> Proposal:
  t0 = time.perf_counter()
  rng = np.random.default_rng([int(ctx.config.seed), int(round(ctx.budget * 1000)), 7])
  cands = [Candidate(f"random{i}", "fair_static_qat",
                     landscape.random_maximal(ctx.numel, ctx.budget, ctx.choices, rng))
           for i in range(int(ctx.config.protocol.random_count))]
  return Proposal(cands, time.perf_counter() - t0)


@ARMS.register("oracle")
def _oracle(ctx: Context) -> Optional[Proposal]:
  """Every maximal allocation, or None (the arm skipped) when there are too many."""
  limit = int(ctx.config.protocol.oracle_limit)
  if len(ctx.choices) ** len(ctx.numel) > landscape.MAX_ALLOCATIONS:
    return None
  t0 = time.perf_counter()
  every = landscape.maximal(ctx.numel, ctx.budget, ctx.choices)
  if len(every) > limit:
    return None
  return Proposal([Candidate(f"alloc{i}", "fair_static_qat", b) for i, b in enumerate(every)],
                  time.perf_counter() - t0, info=dict(allocations=len(every)))
