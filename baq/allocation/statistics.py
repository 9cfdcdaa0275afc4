"""The per-group statistics that importance measures read, from a calibration sample.

`calibration_split` draws a group-balanced sample; `kernel_statistics` sums
every group's gradient (and Hutchinson Hessian trace or diagonal) with
respect to each quantized kernel over it; `loss_deltas` gives the "forward"
measures a function that evaluates each group's loss change when one kernel
moves. Group statistics are sums over the whole sample divided by each
group's count, so they do not depend on how examples fall into batches.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq.allocation import curvature, importance
from baq.data.pipeline import eval_batches
from baq.fairness import losses


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
