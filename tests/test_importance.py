"""Importance measures, reducers and the planner's group statistics, as math."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from baq.allocation import importance, planner, statistics
from baq.fairness import losses
from baq.data.datasets import Split
from baq.quant import units
from baq.quant.inject import QuantSpec

G = 3


def _mlp_params(key):
  k1, k2 = jax.random.split(key)
  return {"Dense_0": {"kernel": 0.5 * jax.random.normal(k1, (4, 5)), "bias": jnp.zeros(5)},
          "head": {"kernel": 0.5 * jax.random.normal(k2, (5, 3)), "bias": jnp.zeros(3)}}


def _mlp(params, x):
  x = x.reshape(x.shape[0], -1)[:, :4]  # 4 of the 12 pixel values
  h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def _layers(per_channel):
  return [units.LayerUnits("Dense_0", ("Dense_0", "Dense_0", "bits"), ("Dense_0", "kernel"),
                       5 if per_channel else 1, 4 if per_channel else 20),
          units.LayerUnits("head", ("head", "head", "bits"), ("head", "kernel"),
                       3 if per_channel else 1, 5 if per_channel else 15)]


def _split(n=37, seed=0):
  rng = np.random.default_rng(seed)
  return Split(images=rng.integers(0, 255, (n, 2, 2, 3), dtype=np.uint8),
               labels=rng.integers(0, 3, n).astype(np.int32),
               groups=rng.integers(0, G, n).astype(np.int32), num_classes=3, num_groups=G,
               class_names=("a", "b", "c"), group_names=("x", "y", "z"), name="toy")


def _direct_group_loss(params, split):
  from baq.data.pipeline import normalize
  x = jnp.asarray(normalize(split.images))
  per_ex = losses.cross_entropy(_mlp(params, x), jnp.asarray(split.labels))
  return losses.group_stats(per_ex, jnp.asarray(split.groups), G).mean


def test_measures_match_their_formulas():
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.normal(size=(G, 4, 3)), jnp.float32)
  h = jnp.asarray(rng.normal(size=(G, 4, 3)), jnp.float32)
  dw = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  stats = importance.KernelStats(g, h)
  traced = importance.KernelStats(g, None, jnp.sum(h, (1, 2)))
  np.testing.assert_allclose(importance.grad_magnitude(stats, dw, False),
                             np.sum(np.abs(g) * np.abs(dw), (1, 2)), rtol=1e-5)
  np.testing.assert_allclose(importance.grad_weight(stats, dw, True),
                             np.sum(g * dw, 1) ** 2, rtol=1e-5)
  trace = np.maximum(np.sum(h, 1), 0)  # per output channel, 4 weights each
  np.testing.assert_allclose(importance.hessian_trace(stats, dw, True),
                             0.5 * trace / 4 * np.sum(dw ** 2, 0), rtol=1e-5)
  layer_trace = np.maximum(np.sum(h, (1, 2)), 0)
  for s in (stats, traced):  # from the diagonal, or from the block trace
    np.testing.assert_allclose(importance.hessian_trace(s, dw, False),
                               0.5 * layer_trace / 12 * np.sum(dw ** 2), rtol=1e-5)
  np.testing.assert_allclose(importance.hessian_diag(stats, dw, False),
                             0.5 * np.sum(np.maximum(h, 0) * dw ** 2, (1, 2)), rtol=1e-5)


def test_reducers():
  v = np.array([[1.0, 4.0], [3.0, 2.0], [2.0, 0.0]])  # [G, units]
  mass = v.sum(1)
  np.testing.assert_allclose(importance.reduce("max", v, mass), [3, 4])
  np.testing.assert_allclose(importance.reduce("mean", v, mass), [2, 2])
  np.testing.assert_allclose(importance.reduce("cvar", v, mass, alpha=1.0), [2, 2], rtol=1e-6)
  np.testing.assert_allclose(importance.reduce("cvar", v, mass, alpha=1 / 3), [3, 4], rtol=1e-5)
  # alpha = 1/2 of 3 groups: the worst group and half of the second worst.
  np.testing.assert_allclose(importance.reduce("cvar", v, mass, alpha=0.5),
                             [(3 + 0.5 * 2) / 1.5, (4 + 0.5 * 2) / 1.5], rtol=1e-5)
  np.testing.assert_allclose(importance.reduce("balanced", v, mass),
                             np.max(v / mass[:, None], 0))
  two = v[:2]
  np.testing.assert_allclose(importance.reduce("subtractive", two, two.sum(1), beta=0.5),
                             two[1] - 0.5 * two[0])
  with pytest.raises(ValueError, match="exactly 2 groups"):
    importance.reduce("subtractive", v, mass)
  with pytest.raises(KeyError, match="balanced, cvar, max, mean, subtractive"):
    importance.reduce("median", v, mass)


def test_group_statistics_are_exact_and_batching_free():
  params, split = _mlp_params(jax.random.key(0)), _split()
  layers = _layers(False)
  apply = _mlp
  kw = dict(hessian=None, key=jax.random.key(1))
  a = statistics.kernel_statistics(apply, params, layers, split, batch_size=8, **kw)
  b = statistics.kernel_statistics(apply, params, layers, split, batch_size=64, **kw)
  direct = jax.jacrev(_direct_group_loss)(params, split)
  for name in ("Dense_0", "head"):
    np.testing.assert_allclose(a[name].grad, direct[name]["kernel"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a[name].grad, b[name].grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(a["__count__"], np.bincount(split.groups, minlength=G))


def test_hutchinson_diagonal_matches_the_exact_hessian_diagonal():
  params, split = _mlp_params(jax.random.key(2)), _split(24, seed=1)
  layers = _layers(False)
  stats = statistics.kernel_statistics(_mlp, params, layers, split, batch_size=24, hessian="diag",
                                    key=jax.random.key(3), num_probes=256, probe_chunk=128)
  flat0, unravel = jax.flatten_util.ravel_pytree(
      {"Dense_0": params["Dense_0"]["kernel"], "head": params["head"]["kernel"]})
  for g in range(G):
    def loss(v, g=g):
      k = unravel(v)
      p = {n: dict(params[n], kernel=k[n]) for n in ("Dense_0", "head")}
      return _direct_group_loss(p, split)[g]
    hess = np.asarray(jax.jit(jax.hessian(loss))(flat0))  # jitted: eager compiles op by op
    exact = np.diagonal(hess)
    est = np.asarray(jax.flatten_util.ravel_pytree(
        {n: stats[n].hess_diag[g] for n in ("Dense_0", "head")})[0])
    # A Rademacher estimate of H_ii has standard deviation
    # sqrt(sum_{j != i} H_ij^2 / probes): allow 4 of them.
    sigma = np.sqrt((np.sum(hess ** 2, 1) - exact ** 2) / 256)
    assert np.all(np.abs(est - exact) <= 4 * sigma + 1e-6), np.max(np.abs(est - exact) / sigma)


def test_layer_traces_match_the_exact_hessian_block_traces():
  params, split = _mlp_params(jax.random.key(5), ), _split(24, seed=3)
  stats = statistics.kernel_statistics(_mlp, params, _layers(False), split, batch_size=24,
                                    hessian="trace", key=jax.random.key(6), num_probes=128,
                                    probe_chunk=64)
  for name in ("Dense_0", "head"):
    k = params[name]["kernel"]
    for g in range(G):
      def loss(kk, g=g, name=name):
        return _direct_group_loss(dict(params, **{name: dict(params[name], kernel=kk)}), split)[g]
      hess = np.asarray(jax.jit(jax.hessian(loss))(k)).reshape(k.size, k.size)
      # Var of z^T H z over Rademacher z is 2 sum_{i != j} H_ij^2.
      sigma = np.sqrt(2 * (np.sum(hess ** 2) - np.sum(np.diag(hess) ** 2)) / 128)
      assert abs(float(stats[name].hess_trace[g]) - np.trace(hess)) <= 4 * sigma + 1e-6


def test_analysis_allocates_within_budget_and_favours_sensitive_units():
  params, split = _mlp_params(jax.random.key(4)), _split(60, seed=2)
  layers = _layers(True)
  spec = QuantSpec(granularity="channel")
  a = planner.analyse(_mlp, params, layers, lambda name: spec, split, measure="grad_weight",
                      choices=(2, 4, 8), batch_size=16)
  assert a.sensitivity.shape == (G, 8, 3) and a.importance.shape == (G, 8)
  assert np.all(a.sensitivity >= 0) and np.all(np.isfinite(a.sensitivity))
  for method in ("auto", "milp", "quantile"):
    bits = planner.allocate(a, 4.0, "max", method=method)
    assert (a.numel * bits).sum() <= 4.0 * a.numel.sum()
    assert set(bits.tolist()) <= {2, 4, 8}
  # Make unit 0 far more sensitive for every group: it gets the most bits.
  a.sensitivity[:, 0] *= 1e6
  bits = planner.allocate(a, 4.0, "cvar", dict(alpha=0.5))
  assert bits[0] == 8


@pytest.mark.parametrize("per_channel", [False, True])
def test_loss_measure_is_the_measured_loss_change_of_each_unit_alone(per_channel):
  """measure="loss": each group's calibration loss with one unit quantized, minus float."""
  from baq.quant import fake_quant as fq
  params, split = _mlp_params(jax.random.key(8)), _split(41, seed=4)
  spec = QuantSpec(granularity="channel" if per_channel else "layer")
  a = planner.analyse(_mlp, params, _layers(per_channel), lambda name: spec, split,
                      measure="loss", choices=(2, 3, 8), batch_size=16)  # batches of 16: padded
  base = np.asarray(_direct_group_loss(params, split))
  u = 0
  for name in ("Dense_0", "head"):
    w = params[name]["kernel"]
    count = w.shape[-1] if per_channel else 1
    for c in range(count):
      for j, k in enumerate((2, 3, 8)):
        q = np.asarray(fq.fake_quant(w, jnp.float32(k), **spec.quant_kwargs()))
        kk = np.asarray(w).copy()
        if per_channel:
          kk[:, c] = q[:, c]
        else:
          kk = q
        got = _direct_group_loss(dict(params, **{name: dict(params[name], kernel=kk)}), split)
        np.testing.assert_allclose(a.sensitivity[:, u, j], np.asarray(got) - base,
                                   rtol=1e-4, atol=1e-6)
      zeroed = np.asarray(w).copy()
      zeroed[..., c if per_channel else slice(None)] = 0.0
      got = _direct_group_loss(dict(params, **{name: dict(params[name], kernel=zeroed)}), split)
      np.testing.assert_allclose(a.importance[:, u], np.asarray(got) - base, rtol=1e-4,
                                 atol=1e-6)
      u += 1
  assert u == a.sensitivity.shape[1]
