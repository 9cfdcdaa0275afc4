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
  * `top_eigenvalues`: power iteration per group, vmapped over groups; it
    stops when every group's Rayleigh quotient changed by at most
    `tol * |lambda|` between iterations, or after `max_iters`.

A unit is a leaf ("layer") or, for leaves with an output-channel axis (the
last one, as Flax kernels keep it), each output channel ("channel").
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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


def _typed(key: jax.Array) -> jax.Array:
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
  all_keys = jax.random.split(_typed(key), num_probes)
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


def _tree_dot(a: Params, b: Params) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _normalise(v: Params) -> Params:
  norm = jnp.sqrt(_tree_dot(v, v))
  return jax.tree.map(lambda x: x / jnp.maximum(norm, 1e-30), v)


class EigenResult(NamedTuple):
  """Top Hessian eigenvalue per group by power iteration.

  Attributes:
    eigenvalue: [G] Rayleigh quotients at the last iterate.
    eigenvector: pytree like params, leaves [G, *shape], unit norm per group.
    iterations: number of iterations run.
    converged: [G] bool, relative change <= tol at the last iteration.
  """

  eigenvalue: jax.Array
  eigenvector: Params
  iterations: jax.Array
  converged: jax.Array


def top_eigenvalues(group_loss: GroupLossFn, params: Params, key: jax.Array,
                    num_groups: int, *, max_iters: int = 100,
                    tol: float = 1e-4, batch_groups: bool | None = None) -> EigenResult:
  """Largest-magnitude Hessian eigenvalue of every group's loss.

  Power iteration v <- H_g v / |H_g v|, all groups in one vmapped HVP per
  iteration. Convergence: |lambda_k - lambda_{k-1}| <= tol * |lambda_k| for
  every group (then the loop stops), else `max_iters`. Power iteration finds
  the eigenvalue of largest magnitude; at a minimum of the loss it is the
  top (positive) one.

  Args:
    group_loss: params -> [G] group losses.
    params: the point at which the Hessians are taken.
    key: PRNG key of the starting vectors.
    num_groups: G.
    max_iters: iteration cap.
    tol: relative tolerance on the eigenvalue.
    batch_groups: vmap the groups' HVPs in one `lax.while_loop` (traceable,
      so it can sit inside `jax.jit`), or run the iterations from Python,
      one jitted HVP per group. None: batched except on CPU, where XLA runs
      the vmapped convolutions of a batched HVP, and convolutions inside a
      while loop, many times slower than standalone ones.

  Returns:
    An EigenResult.
  """
  if batch_groups is None:
    batch_groups = jax.default_backend() != "cpu"

  def hv_one(g, v):
    return hvp(lambda p: group_loss(p)[g], params, v)

  groups = jnp.arange(num_groups)
  keys = jax.random.split(_typed(key), num_groups)
  v0 = jax.vmap(lambda k: _normalise(jax.tree.map(
      lambda x: jax.random.normal(k, x.shape, x.dtype), params)))(keys)

  if not batch_groups:
    return _power_iteration_host(group_loss, params, v0, num_groups, max_iters, tol)

  def step(carry):
    v, lam, _, it, _ = carry
    hv = jax.vmap(hv_one)(groups, v)
    new_lam = jax.vmap(_tree_dot)(v, hv)
    conv = jnp.abs(new_lam - lam) <= tol * jnp.abs(new_lam)
    return jax.vmap(_normalise)(hv), new_lam, lam, it + 1, conv

  def cond(carry):
    *_, it, conv = carry
    return (it < max_iters) & ~jnp.all(conv)

  init = (v0, jnp.full((num_groups,), jnp.inf), jnp.zeros(num_groups), 0,
          jnp.zeros(num_groups, bool))
  v, lam, _, it, conv = jax.lax.while_loop(cond, step, init)
  return EigenResult(lam, v, it, conv)


def _power_iteration_host(group_loss, params, v0, num_groups: int, max_iters: int,
                          tol: float) -> EigenResult:
  """The same iteration and stopping rule, driven from Python."""

  @jax.jit
  def one(p, g, v):
    hv = hvp(lambda q: group_loss(q)[g], p, v)
    return _tree_dot(v, hv), _normalise(hv)

  vs = [jax.tree.map(lambda x, g=g: x[g], v0) for g in range(num_groups)]
  lam = np.full(num_groups, np.inf)
  conv = np.zeros(num_groups, bool)
  it = 0
  while it < max_iters and not conv.all():
    out = [one(params, g, vs[g]) for g in range(num_groups)]
    new = np.array([float(o[0]) for o in out])
    conv = np.abs(new - lam) <= tol * np.abs(new)
    lam, vs, it = new, [o[1] for o in out], it + 1
  v = jax.tree.map(lambda *x: jnp.stack(x), *vs)
  return EigenResult(jnp.asarray(lam, jnp.float32), v, jnp.int32(it), jnp.asarray(conv))


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

  keys = jax.random.split(_typed(key), num_probes).reshape(
      num_probes // probe_chunk, probe_chunk)
  q = jax.lax.map(jax.vmap(one), keys)
  q = q.reshape((num_probes,) + q.shape[2:])
  mean, se = jnp.mean(q, 0), jnp.std(q, 0) / jnp.sqrt(num_probes)
  if per_leaf:
    return TraceEstimate(jax.tree.unflatten(tree, list(mean)),
                         jax.tree.unflatten(tree, list(se)))
  return TraceEstimate(mean, se)
