"""Budgeted mixed-precision plans from group-aware importance (FairQuant stage 2).

`analyse` measures, on a group-balanced calibration sample, every group's
statistics of each quantized kernel of a float model that the importance
measure reads (`baq.allocation.statistics`: gradients, Hessian traces or
diagonals, or measured loss changes), and turns them into importance
[G, units] and sensitivity [G, units, K] tables (`baq.allocation.importance`).
`allocate` reduces the groups and solves the budgeted allocation exactly
(`baq.allocation.solver.solve`), or by FairQuant's quantile baseline, or
(method "minimax") keeps the groups apart and minimises the worst group's
summed sensitivity exactly (`baq.allocation.minimax`). `plan` does
both from a config and returns the plan; the experiment writes it to
WORKDIR/allocation_plan.json, which the `fair_static`, `fair_static_qat` and
allocation-initialised `baq` modes use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.allocation import importance, landscape, minimax, solver, statistics
from baq.quant import fake_quant as fq
from baq.quant import units

# "quantile": FairQuant's baseline; "minimax": the worst group's total, unreduced.
METHODS = solver.METHODS + ("quantile", "minimax")


@dataclasses.dataclass
class Analysis:
  """Importance and sensitivity of every unit for every group.

  Attributes:
    units: one name per unit (`units.unit_names`).
    numel: weights per unit.
    choices: candidate bit-widths (ascending); the sensitivity's last axis.
    importance: [G, units] cost of removing the unit, per group.
    sensitivity: [G, units, K] estimated loss increase at each choice.
    group_counts: [G] calibration examples per group.
    measure: the importance measure used.
  """

  units: list
  numel: np.ndarray
  choices: tuple
  importance: np.ndarray
  sensitivity: np.ndarray
  group_counts: np.ndarray
  measure: str

  def reduced(self, reducer: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(importance [units], sensitivity [units, K]) reduced over groups."""
    mass = self.importance.sum(1)
    return (importance.reduce(reducer, self.importance, mass, **kwargs),
            importance.reduce(reducer, self.sensitivity, mass, **kwargs))


@functools.partial(jax.jit, static_argnums=1,
                   static_argnames=("symmetric", "channel_axis", "method", "percentile"))
def _quant_errors(w: jax.Array, choices: tuple[int, ...], **kw) -> list[jax.Array]:
  """fake_quant(w, c) - w for each choice c, in one program: eagerly, the mse
  scale search alone compiled a scan per layer and choice (11 s of the main
  job's allocation on 2 cores)."""
  return [fq.fake_quant(w, jnp.float32(c), **kw) - w for c in choices]


def analyse(apply_fn: Callable, params: Any, layers, spec_for: Callable, split, *,
            measure: str = "hessian", measure_kwargs: dict | None = None,
            choices=solver.DEFAULT_CHOICES, batch_size: int = 128,
            key: jax.Array | None = None, num_probes: int = 32,
            probe_chunk: int = 8) -> Analysis:
  """Importance and sensitivity tables of a float model's quantized units.

  Args:
    apply_fn: (params, images) -> logits of the float model.
    params: the float parameters.
    layers: `units.find_units` of the quantized model.
    spec_for: layer name -> QuantSpec (how the layer would be quantized).
    split: calibration examples.
    measure: a name in `importance.MEASURES`.
    measure_kwargs: the measure's options.
    choices: candidate integer bit-widths.
    batch_size: calibration batch size.
    key: PRNG key of the Hutchinson probes.
    num_probes: probes per batch.
    probe_chunk: probes vmapped at once.

  Returns:
    An Analysis.
  """
  m = importance.MEASURES.get(measure)
  key = jax.random.key(0) if key is None else key
  flat = tu.flatten_dict(dict(params))
  if m.hessian == "forward":
    stats = statistics.loss_deltas(apply_fn, flat, layers, split, batch_size)
  else:
    stats = statistics.kernel_statistics(apply_fn, params, layers, split, batch_size=batch_size,
                                         hessian=m.hessian, key=key,
                                         num_probes=num_probes, probe_chunk=probe_chunk)
  choices = tuple(sorted(int(c) for c in choices))
  imps, sens = [], []
  for l in layers:
    w = flat[l.kernel_path]
    spec = spec_for(l.name)
    kw = spec.quant_kwargs()
    kw.pop("learned_range")
    if kw["method"] == "learned":  # the learned range starts at absmax
      kw["method"] = "absmax"
    dws = _quant_errors(w, choices, **kw)
    i, s = importance.evaluate_measure(measure, stats[l.name], w, dws, l.count > 1,
                                       **(measure_kwargs or {}))
    imps.append(i)
    sens.append(s)
  return Analysis(units.unit_names(layers), units.unit_numels(layers), choices,
                  np.concatenate(imps, 1), np.concatenate(sens, 1),
                  stats["__count__"], measure)


def allocate(analysis: Analysis, target_bits: float, reducer: str = "max",
             reducer_kwargs: dict | None = None, method: str = "auto") -> np.ndarray:
  """Integer bits per unit meeting `target_bits`.

  Args:
    analysis: the importance tables.
    target_bits: numel-weighted average-bit budget.
    reducer: a name in `importance.REDUCERS`.
    reducer_kwargs: its options (e.g. alpha for cvar).
    method: "auto", "dp" or "milp" (exact, on the reduced sensitivity),
      "quantile" (FairQuant's baseline, on the reduced importance) or
      "minimax" (exact, on every group's sensitivity; the reducer is unused).

  Returns:
    int64 [units] bit-widths.
  """
  if method == "minimax":
    # More bits are never estimated worse than fewer (a running minimum over
    # the ascending choices): measured increases are noisy, and a table that
    # rewards fewer bits would leave budget unspent. Every group's total then
    # only falls as a unit rises, so the budget left over is spent without
    # losing the optimum.
    sens = np.minimum.accumulate(analysis.sensitivity, axis=-1)
    bits = minimax.solve_minimax(sens, analysis.numel, target_bits, analysis.choices)
    gain = np.concatenate([(sens[..., :-1] - sens[..., 1:]).sum(0),
                           np.zeros(sens.shape[1:2] + (1,))], -1)
    return landscape.fill_budget(bits, analysis.numel, target_bits, analysis.choices, gain)
  imp, sens = analysis.reduced(reducer, **(reducer_kwargs or {}))
  if method == "quantile":
    return solver.quantile_assignment(imp, analysis.numel, target_bits, analysis.choices)
  return solver.solve(sens, analysis.numel, target_bits, analysis.choices, method=method)


def plan(config: ml_collections.ConfigDict, apply_fn: Callable, float_params: Any,
         layers, spec_for: Callable, split, budget: float) -> dict:
  """Analyses a float model and allocates its bits at `budget` (no file I/O).

  Args:
    config: the experiment config (its `importance` section and seed).
    apply_fn: (params, images) -> logits of the float model.
    float_params: its parameters.
    layers: `units.find_units` of the quantized model.
    spec_for: layer name -> QuantSpec (the quantizer's rules).
    split: the training split; a group-balanced calibration sample is drawn.
    budget: the average-bit budget.

  Returns:
    The plan (`plan_from`).
  """
  a = analyse_for(config, apply_fn, float_params, layers, spec_for, split)
  return plan_from(config, a, layers, budget)


def analyse_for(config: ml_collections.ConfigDict, apply_fn: Callable, float_params: Any,
                layers, spec_for: Callable, split) -> Analysis:
  """`analyse` with the config's `importance` settings, on a group-balanced
  calibration sample of `split` (`importance.calib_per_group` per group)."""
  ic = config.importance
  calib = statistics.calibration_split(split, ic.calib_per_group, config.seed)
  return analyse(apply_fn, float_params, layers, spec_for, calib, measure=ic.measure,
                 measure_kwargs=ic.measure_kwargs.to_dict(), choices=ic.choices,
                 batch_size=ic.batch_size, key=jax.random.key(config.seed),
                 num_probes=ic.num_probes, probe_chunk=ic.probe_chunk)


def plan_from(config: ml_collections.ConfigDict, a: Analysis, layers, budget: float) -> dict:
  """The plan of an analysis at `budget` with the config's reducer and method.

  Returns:
    units, numel, integer bits (`units.find_units` order), budget, avg_bits,
    the settings, group counts, importance reduced and per group, and
    group_totals: each group's summed sensitivity at the bits (the additive
    estimate of its loss increase; the minimax method's objective is their
    max).
  """
  ic = config.importance
  bits = allocate(a, budget, ic.reducer, ic.reducer_kwargs.to_dict(), ic.method)
  imp, _ = a.reduced(ic.reducer, **ic.reducer_kwargs.to_dict())
  return dict(units=units.unit_names(layers), numel=a.numel.tolist(), bits=bits.tolist(),
              target_bits=budget, avg_bits=float((a.numel * bits).sum() / a.numel.sum()),
              measure=ic.measure, reducer=ic.reducer, method=ic.method,
              choices=list(a.choices), group_counts=a.group_counts.tolist(),
              importance=imp.tolist(), importance_per_group=a.importance.tolist(),
              group_totals=minimax.group_totals(a.sensitivity, bits, a.choices).tolist())


def matches(saved: dict, layers, budget: float) -> bool:
  """Whether a saved plan was made for these units at this budget."""
  return saved["units"] == units.unit_names(layers) and saved["target_bits"] == budget
