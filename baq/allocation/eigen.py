"""Top Hessian eigenvalue of every group's loss, by power iteration.

`top_eigenvalues` runs power iteration per group, vmapped over groups (one
HVP of `baq.allocation.curvature` per iteration); it stops when every group's
Rayleigh quotient changed by at most `tol * |lambda|` between iterations, or
after `max_iters`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from baq.allocation.curvature import GroupLossFn, Params, hvp, typed_key


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
  keys = jax.random.split(typed_key(key), num_groups)
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
