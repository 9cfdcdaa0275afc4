"""Group curvature: Hessian-vector products, Hutchinson traces, top eigenvalues.

Pure functions of a *group-loss function* `group_loss(params) -> [G]` (each
group's mean loss on one batch; see `group_loss_fn`), parameters and vectors
shaped like the parameters. Every group is handled at once:

  * `group_hvp`: H_g v for all g from one forward-over-reverse pass
    (`jax.jvp` of `jax.jacrev`): G reverse passes vmapped, one tangent.
  * `hutchinson`: per-unit Hessian traces and diagonals per group from
    Rademacher probes z, since E[z_u (H z)_u] = H_uu elementwise, so one HVP
    per probe gives every unit's trace (sum over the unit's entries) and
    diagonal at once. Probes are vmapped `probe_chunk` at a time (lax.scan
    over chunks, summing the diagonal as it goes), which bounds memory at
    chunk x G x params; on CPU, `batch_groups=False` loops instead.
  * `group_traces`: every group's Hessian trace (whole model or per leaf)
    from forward-over-forward second directional derivatives of each
    example's loss: one batched pass per probe for all groups at once, no
    reverse pass, so much cheaper than HVPs when only traces are needed.

The top eigenvalue per group (power iteration) is in `baq.allocation.eigen`.

A unit is a leaf ("layer") or, for leaves with an output-channel axis (the
last one, as Flax kernels keep it), each output channel ("channel").
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from baq.fairness import losses

Params = Any
GroupLossFn = Callable[[Params], jax.Array]


def group_loss_fn(apply_fn: Callable, batch: dict, num_groups: int) -> GroupLossFn:
  """params -> [G] mean cross-entropy per group on `batch`.

  Args:
    apply_fn: (params, images) -> logits.
    batch: dict with `image`, `label`, `group` and optionally `mask`.
    num_groups: G.

  Returns:
    The group-loss function (absent groups give 0 and zero curvature).
  """

  def fn(params):
    per_ex = losses.cross_entropy(apply_fn(params, batch["image"]), batch["label"])
    return losses.group_stats(per_ex, batch["group"], num_groups, batch.get("mask")).mean

  return fn


def hvp(loss: Callable[[Params], jax.Array], params: Params, v: Params) -> Params:
  """H v of a scalar loss, forward-over-reverse (`jax.jvp` of `jax.grad`)."""
  return jax.jvp(jax.grad(loss), (params,), (v,))[1]


def group_hvp(group_loss: GroupLossFn, params: Params, v: Params) -> Params:
  """H_g v for every group g at once; each leaf gains a leading [G] axis."""
  return jax.jvp(jax.jacrev(group_loss), (params,), (v,))[1]


def typed_key(key: jax.Array) -> jax.Array:
  """A typed PRNG key from either a typed or a raw uint32 key."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def _rademacher(key: jax.Array, params: Params) -> Params:
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [
      jax.random.rademacher(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def unit_sum(x: jax.Array, per_channel: bool, lead: int = 0) -> jax.Array:
  """Sums a leaf over each unit: all entries, or all but the last axis.

  Args:
    x: an array with `lead` leading batch axes before the leaf's own.
    per_channel: one unit per entry of the last axis (if the leaf has >1 dim).
    lead: number of leading axes to keep.

  Returns:
    [*lead] for a layer unit, [*lead, C] per channel.
  """
  own = x.ndim - lead
  if per_channel and own > 1:
    return jnp.sum(x, axis=tuple(range(lead, x.ndim - 1)))
  return jnp.sum(x, axis=tuple(range(lead, x.ndim)))


class HutchinsonEstimate(NamedTuple):
  """Per-group Hutchinson estimates.

  Attributes:
    trace: pytree like params; each leaf [G] (layer) or [G, C] (per channel):
      the trace of the unit's diagonal Hessian block per group.
    diagonal: pytree like params, leaves [G, *leaf shape]: diag(H_g).
    trace_stderr: like `trace`, the standard error over probes.
  """

  trace: Params
  diagonal: Params
  trace_stderr: Params


def hutchinson(group_loss: GroupLossFn, params: Params, key: jax.Array, *,
               num_probes: int = 64, probe_chunk: int = 8, per_channel: bool = True,
               batch_groups: bool = True, args: tuple = ()) -> HutchinsonEstimate:
  """Hutchinson estimates of per-unit traces and diagonals, every group at once.

  Args:
    group_loss: (params, *args) -> [G] group losses.
    params: the point at which the Hessians are taken.
    key: PRNG key of the Rademacher probes.
    num_probes: number of probes (a multiple of `probe_chunk`).
    probe_chunk: probes vmapped together; lowers peak memory when smaller.
    per_channel: units are output channels (else whole leaves).
    batch_groups: one traceable computation (vmapped groups and probes under
      `lax.scan`, so it can sit inside `jax.jit`); False drives the probes
      from Python with one jitted single-group HVP at a time, the fast path
      on CPU (see `top_eigenvalues`). Both use the same probes.
    args: further arguments of `group_loss` (e.g. the batch): jitted once
      per `group_loss` on the host path, whatever their values.

  Returns:
    A HutchinsonEstimate.
  """
  if num_probes % probe_chunk:
    raise ValueError(f"num_probes={num_probes} must be a multiple of "
                     f"probe_chunk={probe_chunk}.")
  all_keys = jax.random.split(typed_key(key), num_probes)
  if not batch_groups:
    return _hutchinson_host(group_loss, params, all_keys, per_channel, args)
  keys = all_keys.reshape(num_probes // probe_chunk, probe_chunk)

  def one(k):
    z = _rademacher(k, params)
    hz = group_hvp(lambda p: group_loss(p, *args), params, z)
    return jax.tree.map(lambda a, b: a[None] * b, z, hz)  # [G, *shape] z*Hz

  def chunk(diag_sum, ks):
    zhz = jax.vmap(one)(ks)  # leaves [chunk, G, *shape]
    diag_sum = jax.tree.map(lambda acc, x: acc + jnp.sum(x, 0), diag_sum, zhz)
    return diag_sum, jax.tree.map(lambda x: unit_sum(x, per_channel, lead=2), zhz)

  # Only the running diagonal sum and the small per-probe unit traces are
  # kept, so memory is bounded by one chunk of full-size products.
  num_groups = jax.eval_shape(lambda p: group_loss(p, *args), params).shape[0]
  zeros = jax.tree.map(lambda x: jnp.zeros((num_groups,) + x.shape, x.dtype), params)
  diag_sum, per_probe = jax.lax.scan(chunk, zeros, keys)
  per_probe = jax.tree.map(lambda t: t.reshape((num_probes,) + t.shape[2:]), per_probe)
  return _estimate(diag_sum, per_probe, num_probes)


def _estimate(diag_sum, per_probe, num_probes: int) -> HutchinsonEstimate:
  diagonal = jax.tree.map(lambda d: d / num_probes, diag_sum)
  trace = jax.tree.map(lambda t: jnp.mean(t, 0), per_probe)
  stderr = jax.tree.map(lambda t: jnp.std(t, 0) / jnp.sqrt(num_probes), per_probe)
  return HutchinsonEstimate(trace, diagonal, stderr)


@functools.lru_cache(maxsize=1)  # the planner's batches share one group-loss function
def _host_probe(group_loss: Callable) -> Callable:
  """z * H_g z for one probe and one group, jitted once per group-loss function."""

  @jax.jit
  def probe(params, args, g, key):
    z = _rademacher(key, params)
    hz = hvp(lambda q: group_loss(q, *args)[g], params, z)
    return jax.tree.map(jnp.multiply, z, hz)

  return probe


def _hutchinson_host(group_loss, params, keys, per_channel: bool, args) -> HutchinsonEstimate:
  """`hutchinson` with the probes and groups looped in Python (same probes)."""
  probe = _host_probe(group_loss)
  num_groups = jax.eval_shape(lambda p: group_loss(p, *args), params).shape[0]
  diag_sum, per_probe = None, []
  for k in keys:
    zhz = jax.tree.map(lambda *x: jnp.stack(x),
                       *[probe(params, args, g, k) for g in range(num_groups)])
    diag_sum = zhz if diag_sum is None else jax.tree.map(jnp.add, diag_sum, zhz)
    per_probe.append(jax.tree.map(lambda x: unit_sum(x, per_channel, lead=1), zhz))
  per_probe = jax.tree.map(lambda *t: jnp.stack(t), *per_probe)
  return _estimate(diag_sum, per_probe, len(keys))


class TraceEstimate(NamedTuple):
  """Per-group Hessian traces from forward-over-forward Hutchinson probes.

  Attributes:
    trace: [G] (whole model) or a pytree of [G] per leaf (`per_leaf`).
    stderr: like `trace`, the standard error over probes.
  """

  trace: Any
  stderr: Any


def group_traces(per_example_loss: Callable[[Params], jax.Array], params: Params,
                 groups: jax.Array, num_groups: int, key: jax.Array, *,
                 mask: jax.Array | None = None, num_probes: int = 64,
                 probe_chunk: int = 8, per_leaf: bool = False) -> TraceEstimate:
  """Hessian traces of every group's mean loss from one batched pass per probe.

  For a Rademacher probe z, z^T H_g z = sum_{i in g} d^2/dt^2 l_i(w + t z) /
  n_g, and the second directional derivative of every example's loss comes
  from one forward-over-forward pass (`jax.jvp` of `jax.jvp`): all groups'
  quadratic forms cost about three forward passes, where an HVP needs a
  reverse pass per group. E[z^T H_g z] = tr(H_g). With `per_leaf`, each
  leaf gets its own probe (zero elsewhere), giving each leaf's diagonal
  Hessian block trace, at one pass per leaf per probe.

  Args:
    per_example_loss: params -> [N] per-example losses.
    params: the point at which the Hessians are taken.
    groups: [N] int group ids.
    num_groups: G.
    key: PRNG key of the probes.
    mask: optional [N] example weights (padding 0).
    num_probes: a multiple of `probe_chunk`.
    probe_chunk: probes vmapped together.
    per_leaf: one trace per leaf (else one for the whole model).

  Returns:
    A TraceEstimate.
  """
  if num_probes % probe_chunk:
    raise ValueError(f"num_probes={num_probes} must be a multiple of "
                     f"probe_chunk={probe_chunk}.")
  w = jnp.ones(groups.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  count = jnp.maximum(jax.ops.segment_sum(w, groups, num_groups), 1e-12)
  leaves, tree = jax.tree.flatten(params)

  def quad(z):  # [G] z^T H_g z
    d2 = jax.jvp(lambda p: jax.jvp(per_example_loss, (p,), (z,))[1], (params,), (z,))[1]
    return jax.ops.segment_sum(d2 * w, groups, num_groups) / count

  def one(k):
    z = _rademacher(k, params)
    if not per_leaf:
      return quad(z)
    zl = jax.tree.leaves(z)
    return jnp.stack([quad(jax.tree.unflatten(tree, [
        zl[i] if j == i else jnp.zeros_like(x) for j, x in enumerate(leaves)]))
        for i in range(len(leaves))])  # [leaves, G]

  keys = jax.random.split(typed_key(key), num_probes).reshape(
      num_probes // probe_chunk, probe_chunk)
  q = jax.lax.map(jax.vmap(one), keys)
  q = q.reshape((num_probes,) + q.shape[2:])
  mean, se = jnp.mean(q, 0), jnp.std(q, 0) / jnp.sqrt(num_probes)
  if per_leaf:
    return TraceEstimate(jax.tree.unflatten(tree, list(mean)),
                         jax.tree.unflatten(tree, list(se)))
  return TraceEstimate(mean, se)
