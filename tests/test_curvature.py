"""Group curvature against jax.hessian on small problems."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from baq.allocation import curvature
from baq.allocation import eigen

G = 3


def _problem(seed=0):
  """A two-layer tanh net on 3 groups: small enough for jax.hessian."""
  k = jax.random.split(jax.random.key(seed), 5)
  params = {"a": {"kernel": 0.5 * jax.random.normal(k[0], (4, 5))},
            "b": {"kernel": 0.5 * jax.random.normal(k[1], (5, 3)), "bias": jnp.zeros(3)}}
  batch = {"image": jax.random.normal(k[2], (24, 4)),
           "label": jax.random.randint(k[3], (24,), 0, 3),
           "group": jnp.arange(24) % G}

  def apply_fn(p, x):
    return jnp.tanh(x @ p["a"]["kernel"]) @ p["b"]["kernel"] + p["b"]["bias"]

  return params, curvature.group_loss_fn(apply_fn, batch, G)


def _dense_hessians(params, group_loss):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  # jitted: eager, each of the Hessian's many small ops compiles on its own
  return flat, unravel, jax.jit(jax.hessian(lambda f: group_loss(unravel(f))))(flat)  # [G, P, P]


def test_group_hvp_is_exact():
  params, gl = _problem()
  flat, unravel, H = _dense_hessians(params, gl)
  v = jax.random.normal(jax.random.key(9), flat.shape)
  got = curvature.group_hvp(gl, params, unravel(v))
  got = jax.vmap(lambda t: jax.flatten_util.ravel_pytree(t)[0])(got)
  np.testing.assert_allclose(got, H @ v, rtol=1e-5, atol=1e-6)
  one = jax.jit(lambda p, u, g: curvature.hvp(lambda q: gl(q)[g], p, u))
  for g in range(G):
    single = one(params, unravel(v), g)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(single)[0], H[g] @ v,
                               rtol=1e-5, atol=1e-6)


def test_hutchinson_traces_and_diagonals_match_the_hessian():
  params, gl = _problem()
  flat, unravel, H = _dense_hessians(params, gl)
  est = curvature.hutchinson(gl, params, jax.random.key(0), num_probes=2048, probe_chunk=256)
  diag = jax.vmap(lambda d: d)(jnp.diagonal(H, axis1=1, axis2=2))  # [G, P]
  true_diag = jax.vmap(unravel)(diag)
  for path in (("a", "kernel"), ("b", "kernel")):
    want = true_diag[path[0]][path[1]].sum(1)  # per output channel: [G, C]
    got = est.trace[path[0]][path[1]]
    assert got.shape == want.shape
    scale = np.abs(np.asarray(want)).max()
    # Tolerance: 5 standard errors, and 10% of the largest trace.
    err = np.abs(np.asarray(got - want))
    assert np.all(err <= 5 * np.asarray(est.trace_stderr[path[0]][path[1]]) + 1e-6), err
    assert err.max() <= 0.1 * scale
  np.testing.assert_allclose(est.diagonal["b"]["bias"], true_diag["b"]["bias"], atol=0.05)


def test_layer_units_sum_whole_leaves():
  params, gl = _problem()
  est = curvature.hutchinson(gl, params, jax.random.key(1), num_probes=8, probe_chunk=4,
                     per_channel=False)
  assert est.trace["a"]["kernel"].shape == (G,)
  with pytest.raises(ValueError, match="multiple of probe_chunk"):
    curvature.hutchinson(gl, params, jax.random.key(1), num_probes=10, probe_chunk=4)


def test_hutchinson_host_loop_uses_the_same_probes_as_the_batched_path():
  params, gl = _problem()
  scaled = lambda p, s: gl(p) * s  # an extra argument, as the planner passes its batch
  kw = dict(num_probes=8, probe_chunk=4)
  batched = curvature.hutchinson(gl, params, jax.random.key(3), **kw)
  host = curvature.hutchinson(scaled, params, jax.random.key(3), batch_groups=False,
                      args=(jnp.float32(2.0),), **kw)
  for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(host)):
    np.testing.assert_allclose(2.0 * np.asarray(a), b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_groups", [True, False])
def test_power_iteration_finds_each_groups_top_eigenvalue(batch_groups):
  params, gl = _problem()
  _, _, H = _dense_hessians(params, gl)
  res = eigen.top_eigenvalues(gl, params, jax.random.key(3), G, max_iters=2000, tol=1e-7,
                          batch_groups=batch_groups)
  for g in range(G):
    ev = np.linalg.eigvalsh(np.asarray(H[g], np.float64))
    want = ev[np.argmax(np.abs(ev))]
    assert res.eigenvalue[g] == pytest.approx(want, rel=1e-2)
  assert bool(np.all(res.converged))


def test_group_traces_match_exact_traces_whole_model_and_per_leaf():
  """Forward-over-forward traces against jax.hessian, within 4 standard errors."""
  rng = np.random.default_rng(0)
  params = {"a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)
  groups = jnp.asarray(rng.integers(0, 3, 20))
  mask = jnp.asarray((rng.random(20) > 0.2).astype(np.float32))

  def per_example(p):
    return jnp.sum(jnp.tanh(x @ p["a"] + p["b"]) ** 2 * jnp.cos(x[:, :2]), 1)

  est = curvature.group_traces(per_example, params, groups, 3, jax.random.key(0), mask=mask,
                               num_probes=512, probe_chunk=64)
  leaf = curvature.group_traces(per_example, params, groups, 3, jax.random.key(1), mask=mask,
                                num_probes=512, probe_chunk=64, per_leaf=True)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  for g in range(3):
    sel = (groups == g) * mask

    def loss(v, sel=sel):
      return jnp.sum(per_example(unravel(v)) * sel) / jnp.sum(sel)

    hess = np.asarray(jax.hessian(loss)(flat))
    sigma = np.sqrt(2 * (np.sum(hess ** 2) - np.sum(np.diag(hess) ** 2)) / 512)
    assert abs(float(est.trace[g]) - np.trace(hess)) <= 4 * sigma + 1e-6
    assert float(est.stderr[g]) == pytest.approx(sigma, rel=0.5)
    blocks = {"a": slice(0, 6), "b": slice(6, 8)}
    for name, sl in blocks.items():
      h = hess[sl, sl]
      s = np.sqrt(2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2)) / 512)
      assert abs(float(leaf.trace[name][g]) - np.trace(h)) <= 4 * s + 1e-6
