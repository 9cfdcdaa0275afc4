"""Budgeted mixed-precision plans from group-aware importance (FairQuant stage 2).

`analyse` measures, on a group-balanced calibration sample, every group's
gradient (and Hutchinson Hessian diagonal when the measure needs it) with
respect to each quantized kernel of a float model, and turns them into
importance [G, units] and sensitivity [G, units, K] tables (`baq.allocation.importance`).
`allocate` reduces the groups and solves the budgeted allocation exactly
(`baq.allocation.solver.solve`), or by FairQuant's quantile baseline. `plan` does
both from a config and returns the plan; the experiment writes it to
WORKDIR/allocation_plan.json, which the `fair_static`, `fair_static_qat` and
allocation-initialised `baq` modes use.

Group statistics are sums over the whole calibration sample divided by each
group's count, so they do not depend on how examples fall into batches.
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

from baq.allocation import curvature, importance, solver
from baq.fairness import losses
from baq.data.pipeline import eval_batches
from baq.quant import fake_quant as fq
from baq.quant import units



METHODS = solver.METHODS + ("quantile",)  # "quantile": FairQuant's baseline


def calibration_split(split, per_group: int, seed: int):
  """Up to `per_group` examples of every group, drawn without replacement."""
  rng = np.random.default_rng([seed, 7])
  keep = []
  for g in range(split.num_groups):
    idx = np.flatnonzero(split.groups == g)
    keep.append(rng.choice(idx, min(per_group, len(idx)), replace=False))
  return split.subset(np.sort(np.concatenate(keep)))


def _group_means(totals: dict, names: list, num_groups: int) -> dict:
  """Summed per-group statistics divided by each group's count."""
  count = totals["count"]
  denom = jnp.maximum(count, 1.0)

  def mean(stat, name):
    if stat not in totals:
      return None
    x = totals[stat][name]
    return x / denom.reshape((num_groups,) + (1,) * (x.ndim - 1))

  stats = {n: importance.KernelStats(mean("grad", n), mean("diag", n), mean("trace", n))
           for n in names}
  stats["__count__"] = np.asarray(count)
  return stats


# One function over 60 lines: the batch step closes over the kernels, the
# loss and the probe settings; split up, those six closures would be passed
# around instead.
def kernel_statistics(apply_fn: Callable, params: Any, layers, split, *,
                      batch_size: int, hessian: str | None, key: jax.Array,
                      num_probes: int = 32, probe_chunk: int = 8) -> dict:
  """Per-group gradient and Hessian diagonal of each quantized kernel.

  Args:
    apply_fn: (params, images) -> logits of the float model.
    params: its parameters.
    layers: `units.find_units` of the quantized model (kernel paths).
    split: calibration examples.
    batch_size: examples per pass (the last batch is padded and masked).
    hessian: None; "trace" for each kernel's Hessian block trace per group
      (forward-over-forward probes, `curvature.group_traces`) when every
      layer is one unit, else the diagonal; "diag" for the Hutchinson
      diagonal (`curvature.hutchinson`).
    key: PRNG key of the probes.
    num_probes: Hutchinson probes per batch.
    probe_chunk: probes vmapped at once (bounds memory).

  Returns:
    layer name -> importance.KernelStats of group *mean* statistics, and
    the [G] calibration counts under the key "__count__".
  """
  flat = tu.flatten_dict(dict(params))
  kernels = {l.name: flat[l.kernel_path] for l in layers}
  G = split.num_groups

  def with_kernels(k):
    f = dict(flat)
    f.update({l.kernel_path: k[l.name] for l in layers})
    return tu.unflatten_dict(f)

  if hessian not in (None, "trace", "diag"):
    raise ValueError(f"hessian must be None, 'trace' or 'diag', got {hessian!r}.")
  want_trace = hessian == "trace" and all(l.count == 1 for l in layers)
  want_diag = hessian == "diag" or (hessian == "trace" and not want_trace)
  # On CPU the diagonal's HVPs run one group and probe at a time, outside
  # the jitted batch step (curvature.hutchinson, batch_groups=False).
  diag_in_jit = jax.default_backend() != "cpu"
  hutchinson = functools.partial(curvature.hutchinson, num_probes=num_probes,
                                 probe_chunk=probe_chunk)

  def per_example(k, batch):
    return losses.cross_entropy(apply_fn(with_kernels(k), batch["image"]), batch["label"])

  def group_sum(k, batch):  # [G] summed (not mean) loss: batches then add up exactly.
    return jax.ops.segment_sum(per_example(k, batch) * batch["mask"], batch["group"], G)

  @jax.jit
  def one_batch(batch, bkey):
    count = jax.ops.segment_sum(batch["mask"], batch["group"], G)
    out = dict(grad=jax.jacrev(group_sum)(kernels, batch), count=count)
    if want_diag and diag_in_jit:
      out["diag"] = hutchinson(group_sum, kernels, bkey, args=(batch,)).diagonal
    if want_trace:  # group means on this batch, back to sums
      est = curvature.group_traces(lambda k: per_example(k, batch), kernels, batch["group"],
                                   G, bkey, mask=batch["mask"], num_probes=num_probes,
                                   probe_chunk=probe_chunk, per_leaf=True)
      out["trace"] = jax.tree.map(lambda t: t * count, est.trace)
    return out

  totals = None  # sums over batches, so the result does not depend on the batching
  for i, batch in enumerate(eval_batches(split, batch_size)):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    bkey = jax.random.fold_in(key, i)
    out = one_batch(batch, bkey)
    if want_diag and not diag_in_jit:
      out["diag"] = hutchinson(group_sum, kernels, bkey, args=(batch,),
                               batch_groups=False).diagonal
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  return _group_means(totals, list(kernels), G)


def loss_deltas(apply_fn: Callable, flat: dict, layers, split, batch_size: int) -> dict:
  """Layer name -> loss_delta(dw) -> [G]: each group's mean loss change with dw added.

  The "forward" measures' statistics (`importance.Measure`): every other
  kernel stays at its float value. Group means are over the whole split.
  """
  G = split.num_groups
  batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in eval_batches(split, batch_size)]

  @jax.jit
  def group_sums(f, batch):
    loss = losses.cross_entropy(apply_fn(tu.unflatten_dict(f), batch["image"]), batch["label"])
    return jax.ops.segment_sum(loss * batch["mask"], batch["group"], G)

  count = sum(jax.ops.segment_sum(b["mask"], b["group"], G) for b in batches)
  denom = jnp.maximum(count, 1.0)

  def mean_loss(f):
    return sum(group_sums(f, b) for b in batches) / denom

  base = mean_loss(flat)

  def delta_for(path):
    return lambda dw: mean_loss({**flat, path: flat[path] + dw}) - base

  stats = {l.name: delta_for(l.kernel_path) for l in layers}
  stats["__count__"] = np.asarray(count)
  return stats


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
    stats = loss_deltas(apply_fn, flat, layers, split, batch_size)
  else:
    stats = kernel_statistics(apply_fn, params, layers, split, batch_size=batch_size,
                              hessian=m.hessian, key=key, num_probes=num_probes,
                              probe_chunk=probe_chunk)
  choices = tuple(sorted(int(c) for c in choices))
  imps, sens = [], []
  for l in layers:
    w = flat[l.kernel_path]
    spec = spec_for(l.name)
    kw = spec.quant_kwargs()
    if kw["method"] == "learned":  # the learned range starts at absmax
      kw["method"] = "absmax"
    dws = [fq.fake_quant(w, jnp.float32(c), **kw) - w for c in choices]
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
    method: "auto", "dp" or "milp" (exact) or "quantile" (FairQuant's baseline).

  Returns:
    int64 [units] bit-widths.
  """
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
    The plan: units, numel, integer bits (`units.find_units` order), budget,
    avg_bits, the settings, group counts, and importance reduced and per group.
  """
  ic = config.importance
  calib = calibration_split(split, ic.calib_per_group, config.seed)
  a = analyse(apply_fn, float_params, layers, spec_for, calib, measure=ic.measure,
              measure_kwargs=ic.measure_kwargs.to_dict(), choices=ic.choices,
              batch_size=ic.batch_size, key=jax.random.key(config.seed),
              num_probes=ic.num_probes, probe_chunk=ic.probe_chunk)
  bits = allocate(a, budget, ic.reducer, ic.reducer_kwargs.to_dict(), ic.method)
  imp, _ = a.reduced(ic.reducer, **ic.reducer_kwargs.to_dict())
  return dict(units=units.unit_names(layers), numel=a.numel.tolist(), bits=bits.tolist(),
              target_bits=budget, avg_bits=float((a.numel * bits).sum() / a.numel.sum()),
              measure=ic.measure, reducer=ic.reducer, method=ic.method,
              choices=list(a.choices), group_counts=a.group_counts.tolist(),
              importance=imp.tolist(), importance_per_group=a.importance.tolist())


def matches(saved: dict, layers, budget: float) -> bool:
  """Whether a saved plan was made for these units at this budget."""
  return saved["units"] == units.unit_names(layers) and saved["target_bits"] == budget
