"""Group-aware importance of a language model's layers, for mixed-precision GPTQ.

The groups of a language model are losses, not image subsets: the
language-modelling loss on calibration text, and one *pair loss* per bias
type, mean softplus(ll(stereotype) - ll(anti-stereotype)) over that type's
paired sentences: the log-loss of preferring the stereotyped sentence, which
grows as a model prefers it more. A caller gives them as one function
params -> [G] losses (`group_loss`), and this module measures, for every
layer (a unit: GPTQ-format checkpoints carry one bit-width per layer) and
every candidate bit-width, how much each group's loss would rise with that
layer round-to-nearest quantized on GPTQ's grid, using the same measures as
the vision path (`baq.allocation.importance`): "grad", "grad_weight",
"hessian" (Hutchinson traces, HAWQ-V2), "hessian_diag" or "loss" (measured).
The result is a `planner.Analysis`, so the reducers and the exact allocator
(`planner.allocate`) apply unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq.allocation import curvature, importance, planner
from baq.quant import gptq

GroupLoss = Callable[[Any], jax.Array]


def _kernels(params, layers: Sequence[str]) -> dict[str, jax.Array]:
  flat = tu.flatten_dict(params, sep="/")
  missing = [l for l in layers if f"{l}/kernel" not in flat]
  if missing:
    raise ValueError(f"No kernel for layers {missing}.")
  return {l: flat[f"{l}/kernel"] for l in layers}


def _with_kernels(params, kernels: dict[str, jax.Array]):
  flat = dict(tu.flatten_dict(params, sep="/"))
  flat.update({f"{l}/kernel": k for l, k in kernels.items()})
  return tu.unflatten_dict(flat, sep="/")


def _stats(group_loss: GroupLoss, params, kernels, hessian: Optional[str], key,
           num_probes: int, probe_chunk: int) -> dict[str, importance.KernelStats]:
  """Per-group gradients (and curvature) of the kernels only."""
  loss_k = lambda ks: group_loss(_with_kernels(params, ks))
  grads = jax.jit(jax.jacrev(loss_k))(kernels)  # leaves [G, *kernel]
  diag = trace = None
  if hessian in ("trace", "diag"):
    est = curvature.hutchinson(loss_k, kernels, key, num_probes=num_probes,
                               probe_chunk=probe_chunk, per_channel=False, batch_groups=False)
    diag, trace = est.diagonal, est.trace
  return {l: importance.KernelStats(grads[l], None if diag is None else diag[l],
                                    None if trace is None else trace[l]) for l in kernels}


def analyse(group_loss: GroupLoss, params: Any, layers: Sequence[str], *,
            measure: str = "hessian", choices: Sequence[int] = (2, 3, 4, 8),
            group_size: Optional[int] = None, group_counts: Optional[np.ndarray] = None,
            key: Optional[jax.Array] = None, num_probes: int = 16,
            probe_chunk: int = 4, grid: str = "full") -> planner.Analysis:
  """Importance and sensitivity of each layer for each group.

  Args:
    group_loss: params -> [G] group losses (calibration batches closed over).
    params: the float model's params.
    layers: module paths of the layers to allocate ("block_0/attn/q_proj", ...).
    measure: a name in `importance.MEASURES`.
    choices: candidate bit-widths (GPTQ checkpoints hold 2, 3, 4 or 8).
    group_size: GPTQ's group size of the deployed grid (None: per channel).
    group_counts: [G] examples behind each group loss (recorded only).
    key: PRNG key of the Hutchinson probes.
    num_probes: Hutchinson probes.
    probe_chunk: probes per chunk.
    grid: GPTQ's grid of the deployed kernel (`gptq.GRIDS`).

  Returns:
    A `planner.Analysis` with one unit per layer.
  """
  m = importance.MEASURES.get(measure)
  choices = tuple(sorted(int(c) for c in choices))
  kernels = _kernels(params, layers)
  key = jax.random.key(0) if key is None else key
  if m.hessian == "forward":
    base = np.asarray(jax.jit(group_loss)(params))
    loss_jit = jax.jit(group_loss)

    def stats_for(l):
      return lambda dw: np.asarray(loss_jit(_with_kernels(params, {l: kernels[l] + dw}))) - base
    stats = {l: stats_for(l) for l in layers}
  else:
    stats = _stats(group_loss, params, kernels, m.hessian, key, num_probes, probe_chunk)
  imps, sens = [], []
  for l in layers:
    w = jnp.asarray(kernels[l], jnp.float32)
    dws = [gptq.rtn(w, c, group_size, grid=grid) - w for c in choices]
    i, s = importance.evaluate_measure(measure, stats[l], w, dws, False)
    imps.append(i)
    sens.append(s)
  g = imps[0].shape[0]
  counts = np.ones(g) if group_counts is None else np.asarray(group_counts)
  return planner.Analysis(list(layers), np.asarray([kernels[l].size for l in layers]),
                          choices, np.concatenate(imps, 1), np.concatenate(sens, 1),
                          counts, measure)


def tie(analysis: planner.Analysis, modules: Sequence[Sequence[str]]) -> planner.Analysis:
  """Merges layers that must share one bit-width into one unit each.

  A checkpoint module made of several baq layers (GPT-2's c_attn holds q, k
  and v) carries one bit-width, so its layers are one allocation unit: their
  weights and their per-group costs add up.

  Args:
    analysis: per-layer `analyse` output.
    modules: the layer tuples of each module (`LMFamily.hf_modules(cfg).values()`);
      layers in no tuple stay units of their own.

  Returns:
    An Analysis whose units are "+"-joined layer names, in first-layer order.
  """
  index = {u: i for i, u in enumerate(analysis.units)}
  owner = {}
  for members in modules:
    for l in members:
      owner[l] = tuple(members)
  groups, seen = [], set()
  for u in analysis.units:
    g = tuple(m for m in owner.get(u, (u,)) if m in index)
    if g not in seen:
      seen.add(g)
      groups.append(g)
  cols = [[index[m] for m in g] for g in groups]
  return planner.Analysis(
      ["+".join(g) for g in groups], np.asarray([analysis.numel[c].sum() for c in cols]),
      analysis.choices, np.stack([analysis.importance[:, c].sum(1) for c in cols], 1),
      np.stack([analysis.sensitivity[:, c].sum(1) for c in cols], 1),
      analysis.group_counts, analysis.measure)
