"""The budgeted allocators: exactness against brute force, budget always met."""

import itertools

import numpy as np
import pytest

from baq.allocation import solver


def _instance(rng, n, choices=solver.DEFAULT_CHOICES):
  numel = rng.integers(1, 50, n) * rng.choice([1, 8, 64])
  # Sensitivity falls with bits (convex-ish), with noise: realistic but not sorted.
  base = rng.uniform(0.1, 10, n)[:, None]
  s = base * 2.0 ** (-np.asarray(choices, float))[None, :] + rng.uniform(0, 0.01, (n, len(choices)))
  return s, numel


def _brute(s, numel, target, choices):
  c = np.asarray(sorted(choices))
  best, arg = np.inf, None
  for k in itertools.product(range(len(c)), repeat=len(numel)):
    k = np.array(k)
    if (numel * c[k]).sum() <= target * numel.sum() + 1e-9:
      v = s[np.arange(len(k)), k].sum()
      if v < best:
        best, arg = v, c[k]
  return best, arg


@pytest.mark.parametrize("seed", range(12))
def test_dp_and_milp_are_exact_and_within_budget(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 6))
  s, numel = _instance(rng, n)
  target = float(rng.uniform(2.0, 8.5))
  want, _ = _brute(s, numel, target, solver.DEFAULT_CHOICES)
  for method in ("dp", "milp"):
    bits = solver.solve(s, numel, target, method=method)
    assert (numel * bits).sum() <= target * numel.sum() + 1e-9
    c = list(solver.DEFAULT_CHOICES)
    got = s[np.arange(n), [c.index(b) for b in bits]].sum()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12), method


@pytest.mark.parametrize("seed", range(6))
def test_large_random_instances_meet_the_budget(seed):
  rng = np.random.default_rng(100 + seed)
  s, numel = _instance(rng, 300)
  target = float(rng.uniform(2.5, 7.5))
  dp = solver.solve(s, numel, target, method="dp")
  ilp = solver.solve(s, numel, target, method="milp")
  for bits in (dp, ilp):
    assert (numel * bits).sum() <= target * numel.sum() + 1e-9
    assert set(np.unique(bits)) <= set(solver.DEFAULT_CHOICES)
  c = list(solver.DEFAULT_CHOICES)
  cost = lambda b: s[np.arange(len(b)), [c.index(x) for x in b]].sum()
  assert cost(dp) == pytest.approx(cost(ilp), rel=1e-6)
  q = solver.quantile_assignment(-s[:, 0], numel, target)
  assert (numel * q).sum() <= target * numel.sum() + 1e-9
  assert cost(dp) <= cost(q) + 1e-9  # The exact solver never loses to the baseline.


def test_infeasible_and_bad_inputs_are_refused():
  s, numel = _instance(np.random.default_rng(0), 4)
  with pytest.raises(ValueError, match="below the smallest bit-width choice 2"):
    solver.solve(s, numel, 1.5)
  with pytest.raises(ValueError, match="below the smallest bit-width choice 2"):
    solver.quantile_assignment(np.ones(4), numel, 1.9)
  with pytest.raises(ValueError, match=r"\[4, 6\]"):
    solver.solve(s[:, :3], numel, 4.0)
  with pytest.raises(ValueError, match="Valid: auto, dp, milp"):
    solver.solve(s, numel, 4.0, method="greedy")


def test_loose_budget_takes_each_units_best_choice():
  s = np.array([[3.0, 2.0, 1.0, 0.5, 0.2, 0.1], [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
  np.testing.assert_array_equal(solver.solve(s, [10, 10], 8.0), [8, 3])


def test_quantile_assignment_follows_importance():
  imp = np.arange(12.0)
  bits = solver.quantile_assignment(imp, np.ones(12, int), 8.0)
  np.testing.assert_array_equal(bits, np.repeat(solver.DEFAULT_CHOICES, 2))
  tight = solver.quantile_assignment(imp, np.ones(12, int), 3.0)
  assert tight.mean() <= 3.0 and np.all(np.diff(tight) >= 0)


@pytest.mark.parametrize("seed", range(4))
def test_reduction_is_exact_on_unstructured_sensitivities(seed):
  """Negative, non-monotone costs (a subtractive reducer's) and ties: the
  Lagrangian reduction plus ILP still matches the DP's optimum."""
  rng = np.random.default_rng(200 + seed)
  n = 120
  numel = rng.integers(1, 30, n) * 8
  s = np.round(rng.normal(size=(n, 6)), 1)  # rounding makes ties common
  target = float(rng.uniform(2.5, 7.0))
  c = list(solver.DEFAULT_CHOICES)
  cost = lambda b: s[np.arange(n), [c.index(x) for x in b]].sum()
  dp, ilp = solver.solve(s, numel, target, method="dp"), solver.solve(s, numel, target, method="milp")
  assert (numel * ilp).sum() <= target * numel.sum() + 1e-9
  assert cost(ilp) == pytest.approx(cost(dp), abs=1e-9)


def _quantile_loop(importance, numel, target, choices=(2, 3, 4, 5, 6, 8)):
  """FairQuant's quantile baseline as published: demote one step at a time."""
  imp, w, c = np.asarray(importance, float), np.asarray(numel), np.asarray(sorted(choices))
  cap = int(np.floor(target * w.sum() + 1e-9))
  ranks = np.argsort(np.argsort(imp, kind="stable"), kind="stable")
  k = np.minimum(ranks * len(c) // len(imp), len(c) - 1)
  order = np.argsort(imp, kind="stable")
  while int((w * c[k]).sum()) > cap:
    for u in order:
      if k[u] > 0:
        k[u] -= 1
        break
  return c[k]


@pytest.mark.parametrize("seed", range(60))
def test_quantile_assignment_is_the_one_step_at_a_time_loop(seed):
  rng = np.random.default_rng([seed, 5])
  n = int(rng.integers(1, 40))
  imp = rng.random(n) if seed % 3 else rng.integers(0, 3, n).astype(float)  # ties too
  numel, target = rng.integers(1, 100, n), float(rng.uniform(2, 8))
  np.testing.assert_array_equal(solver.quantile_assignment(imp, numel, target),
                                _quantile_loop(imp, numel, target))
