"""Group losses, the regularizer registry, and each penalty's mathematics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from baq.fairness import losses, regularizers


def _ctx(group_loss, present=None, avg_bits=5.0, target=4.0):
  gl = jnp.asarray(group_loss, jnp.float32)
  present = jnp.ones(gl.shape, bool) if present is None else jnp.asarray(present)
  z = jnp.zeros((4,))
  return regularizers.PenaltyContext(gl, present.astype(jnp.float32), present, z, jnp.zeros((4, 3)),
                          z.astype(int), z.astype(int), jnp.float32(avg_bits),
                          jnp.float32(target), jnp.int32(0))


def test_group_stats_segment_means_and_missing_groups():
  vals = jnp.array([1.0, 3.0, 5.0, 7.0])
  groups = jnp.array([0, 0, 2, 2])
  s = losses.group_stats(vals, groups, 4)
  np.testing.assert_allclose(s.mean, [2.0, 0.0, 6.0, 0.0])
  np.testing.assert_array_equal(s.present, [True, False, True, False])
  s = losses.group_stats(vals, groups, 4, weights=jnp.array([1.0, 0.0, 1.0, 1.0]))
  np.testing.assert_allclose(s.mean, [1.0, 0.0, 6.0, 0.0])


@pytest.mark.parametrize("name", ["smooth_max", "cvar", "gap", "variance", "group_dro"])
def test_penalties_are_finite_and_ignore_absent_groups(name):
  reg = regularizers.build(name)
  state = reg.init(4)
  v, _, _ = reg.apply(_ctx([1.0, 99.0, 3.0, 0.0], present=[True, False, True, False]), state)
  v2, _, _ = reg.apply(_ctx([1.0, 0.0, 3.0, 0.0], present=[True, False, True, False]), state)
  assert np.isfinite(float(v)) and float(v) == pytest.approx(float(v2))
  g = jax.grad(lambda gl: reg.apply(_ctx(gl), state)[0])(jnp.array([1.0, 2.0, 4.0, 3.0]))
  assert float(jnp.abs(g).sum()) > 0 and np.all(np.isfinite(np.asarray(g)))


def test_penalty_values():
  l = [1.0, 2.0, 4.0, 3.0]
  val = lambda name, **kw: float(regularizers.build(name, **kw).apply(_ctx(l), regularizers.build(name, **kw).init(4))[0])
  assert val("gap") == pytest.approx(3.0)
  assert val("variance") == pytest.approx(np.var(l))
  assert val("cvar", alpha=0.5) == pytest.approx(3.5)
  assert val("cvar", alpha=0.25) == pytest.approx(4.0)
  assert val("cvar", alpha=0.375) == pytest.approx((4.0 + 0.5 * 3.0) / 1.5)
  assert val("cvar", alpha=1.0) == pytest.approx(2.5)
  assert 2.5 <= val("smooth_max", temperature=1.0) <= 4.0
  assert val("smooth_max", temperature=0.01) == pytest.approx(4.0, abs=0.02)


def test_group_dro_weights_move_to_the_worst_group():
  reg = regularizers.build("group_dro", step_size=0.5)
  q = reg.init(4)
  for _ in range(20):
    _, q, _ = reg.apply(_ctx([1.0, 2.0, 4.0, 3.0]), q)
  assert int(jnp.argmax(q)) == 2 and float(jnp.sum(q)) == pytest.approx(1.0)


def test_group_dro_keeps_the_weight_of_an_absent_group():
  reg = regularizers.build("group_dro", step_size=0.5)
  q = jnp.array([0.1, 0.2, 0.3, 0.4])
  _, q_new, _ = reg.apply(_ctx([1.0, 9.0, 4.0, 3.0], present=[True, False, True, True]), q)
  assert float(q_new[1]) == pytest.approx(0.2, abs=1e-7)  # absent: unchanged
  assert float(jnp.sum(q_new)) == pytest.approx(1.0, abs=1e-6)
  # The present groups share their old mass (0.8) in Sagawa et al.'s proportions.
  grown = np.array([0.1, 0.3, 0.4]) * np.exp(0.5 * np.array([1.0, 4.0, 3.0]))
  np.testing.assert_allclose(np.asarray(q_new)[[0, 2, 3]], 0.8 * grown / grown.sum(), rtol=1e-6)
  # With every group present it is exactly the standard exponentiated-gradient step.
  _, q_all, _ = reg.apply(_ctx([1.0, 9.0, 4.0, 3.0]), q)
  full = np.array([0.1, 0.2, 0.3, 0.4]) * np.exp(0.5 * np.array([1.0, 9.0, 4.0, 3.0]))
  np.testing.assert_allclose(np.asarray(q_all), full / full.sum(), rtol=1e-6)


def test_bitrate_dual_ascent_raises_multiplier_while_over_budget():
  reg = regularizers.build("bitrate", dual_lr=0.1, rho=0.0)
  lam = reg.init(4)
  for _ in range(5):
    _, lam, m = reg.apply(_ctx([1.0] * 4, avg_bits=5.0, target=4.0), lam)
  assert float(lam) == pytest.approx(0.5)
  g = jax.grad(lambda b: reg.apply(_ctx([1.0] * 4, avg_bits=b), lam)[0])(5.0)
  assert float(g) == pytest.approx(0.5)
  for _ in range(10):
    _, lam, _ = reg.apply(_ctx([1.0] * 4, avg_bits=3.0, target=4.0), lam)
  assert float(lam) == 0.0


def test_bitrate_equality_form_pushes_unused_bits_back_up():
  reg = regularizers.build("bitrate", dual_lr=0.1, rho=2.0, equality=True)
  lam = reg.init(4)
  for _ in range(5):
    _, lam, m = reg.apply(_ctx([1.0] * 4, avg_bits=3.0, target=4.0), lam)
  assert float(lam) == pytest.approx(-0.5)  # Free in sign: under budget.
  g = jax.grad(lambda b: reg.apply(_ctx([1.0] * 4, avg_bits=b, target=4.0), lam)[0])(3.0)
  assert float(g) == pytest.approx(-0.5 + 2.0 * -1.0)  # Descent raises the bits.
  ineq = regularizers.build("bitrate", dual_lr=0.1, rho=2.0)
  assert float(ineq.apply(_ctx([1.0] * 4, avg_bits=3.0, target=4.0), ineq.init(4))[0]) == 0.0


def test_unknown_regularizer_lists_valid_names():
  with pytest.raises(KeyError, match="bitrate, cvar, gap, group_dro, smooth_max, variance"):
    regularizers.build("worst_group")
  with pytest.raises(TypeError, match="cvar"):
    regularizers.build("cvar", temperature=3.0)
