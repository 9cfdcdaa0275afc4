"""The integer projection of searched bit-widths: exact against brute force, and spent.

`projection.nearest` minimises sum_u numel_u (B_u - b_u)^2 over integer
allocations that meet the budget; brute force over every allocation of a
few units is the reference. With `spend`, no unit below max_bits could take
one more bit within the budget.
"""

import itertools

import numpy as np
import pytest

from baq.allocation import projection
from baq.quant import units


def _brute_force(bits, numel, target, lo, hi):
  """The least numel-weighted squared distance over every feasible allocation."""
  cap = np.floor(target * numel.sum() + 1e-9)
  best = np.inf
  for alloc in itertools.product(range(lo, hi + 1), repeat=len(bits)):
    a = np.array(alloc)
    if (numel * a).sum() <= cap:
      best = min(best, float((numel * (a - bits) ** 2).sum()))
  return best


@pytest.mark.parametrize("seed", range(40))
def test_nearest_is_the_brute_force_minimum(seed):
  rng = np.random.default_rng([seed, 12])
  n = int(rng.integers(1, 5))
  numel = rng.integers(1, 80, n)
  bits = rng.uniform(1.5, 8.5, n)
  lo, hi = 2, 7
  target = float(rng.uniform(lo, hi))
  out = projection.nearest(bits, numel, target, lo, hi)
  assert (numel * out).sum() <= target * numel.sum() + 1e-9
  assert out.min() >= lo and out.max() <= hi
  np.testing.assert_allclose((numel * (out - bits) ** 2).sum(),
                             _brute_force(bits, numel, target, lo, hi), rtol=1e-9, atol=1e-9)
  spent = projection.nearest(bits, numel, target, lo, hi, spend=True)
  left = np.floor(target * numel.sum() + 1e-9) - (numel * spent).sum()
  assert left >= 0 and not np.any(numel[spent < hi] <= left)
  assert np.all(spent >= out)  # spending only ever adds bits


def test_the_issues_examples():
  # The common-shift projection gave [2, 8, 8] (2.03 average bits of 3.012).
  numel, bits = np.array([12291, 4, 64]), np.array([3.18, 7.24, 7.99])
  np.testing.assert_array_equal(projection.nearest(bits, numel, 3.012, 2, 8), [3, 7, 5])
  np.testing.assert_array_equal(projection.nearest(bits, numel, 3.012, 2, 8, spend=True),
                                [3, 8, 5])
  # Units already at their nearest integers stay there ([4, 6] before).
  np.testing.assert_array_equal(projection.nearest([3.1, 5.2], [10, 10], 6.0, 2, 8), [3, 5])


@pytest.mark.parametrize("seed", range(25))
def test_projection_meets_budget_after_rounding(seed):
  rng = np.random.default_rng(seed)
  n = rng.integers(1, 60)
  numel = rng.integers(1, 5000, n)
  cont = rng.uniform(1.5, 8.5, n)
  target = rng.uniform(2.0, 8.0)
  ints = projection.nearest(cont, numel, target, 2, 8)
  avg = (numel * ints).sum() / numel.sum()
  assert avg <= target + 1e-9
  assert ints.min() >= 2 and ints.max() <= 8
  assert np.all(ints == np.round(ints))
  # Tight: no unit more than half a bit below its continuous value could be
  # raised a bit within the budget (that would bring it nearer).
  slack = target * numel.sum() - (numel * ints).sum()
  room = (ints < 8) & (ints < cont - 0.5)
  assert not np.any(numel[room] <= slack)
  # Spending: same guarantees, and no unit below max_bits could take a bit.
  spent = projection.nearest(cont, numel, target, 2, 8, spend=True)
  avg_spent = (numel * spent).sum() / numel.sum()
  assert avg <= avg_spent <= target + 1e-9 and spent.min() >= 2 and spent.max() <= 8
  slack = target * numel.sum() - (numel * spent).sum()
  assert not np.any(numel[spent < 8] <= slack)


def test_projection_keeps_a_feasible_allocation():
  cont = np.array([2.0, 3.0, 8.0])
  np.testing.assert_array_equal(projection.nearest(cont, np.array([10, 10, 10]), 6.0, 2, 8), [2, 3, 8])
  # Spending the remaining 5 bits per unit-weight goes where the learned
  # values are least exceeded: alternately to the two low units.
  np.testing.assert_array_equal(
      projection.nearest(cont, np.array([10, 10, 10]), 6.0, 2, 8, spend=True), [5, 5, 8])


def test_impossible_budget_names_the_bound():
  with pytest.raises(ValueError, match="below min_bits"):
    projection.nearest(np.array([4.0]), np.array([1]), 1.5, 2, 8)
  with pytest.raises(ValueError, match="above max_bits"):
    units.check_budget(9.0, 2, 8)


def _maximal(out, numel, target, hi):
  cap = np.floor(target * numel.sum() + 1e-9)
  return all(out[u] == hi or (numel * out).sum() + numel[u] > cap for u in range(len(out)))


@pytest.mark.parametrize("seed", range(20))
def test_measured_is_the_brute_force_best_for_an_additive_loss(seed):
  """For loss = sum_u f_u(B_u), decreasing in each B_u, it finds the best allocation."""
  rng = np.random.default_rng([seed, 31])
  n = int(rng.integers(2, 5))
  numel = rng.integers(1, 60, n)
  lo, hi = 2, 6
  table = np.cumsum(-rng.uniform(0.01, 1.0, (n, hi - lo + 1)), axis=1)  # decreasing in k
  target = float(rng.uniform(lo, hi))

  def loss(b):
    return float(table[np.arange(n), np.asarray(b) - lo].sum())

  calls = []
  out = projection.measured(lambda b: calls.append(1) or loss(b), rng.uniform(lo, hi, n),
                            numel, target, lo, hi)
  cap = np.floor(target * numel.sum() + 1e-9)
  best = min(loss(a) for a in itertools.product(range(lo, hi + 1), repeat=n)
             if (numel * np.array(a)).sum() <= cap)
  assert (numel * out).sum() <= cap and _maximal(out, numel, target, hi)
  assert loss(out) == pytest.approx(best)
  assert len(calls) <= 2 * n * (hi - lo + 1)  # L x K evaluations per round, two rounds


@pytest.mark.parametrize("seed", range(10))
def test_measured_meets_the_budget_and_spends_it_for_any_loss(seed):
  rng = np.random.default_rng([seed, 32])
  n = int(rng.integers(2, 6))
  numel = rng.integers(1, 60, n)
  mix = rng.normal(size=(n, n))
  target = float(rng.uniform(2, 8))

  def loss(b):  # coupled across units, not monotone
    b = np.asarray(b, np.float64)
    return float(np.sin(b @ mix @ b) + np.exp(-b).sum())

  out = projection.measured(loss, rng.uniform(2, 8, n), numel, target, 2, 8)
  assert (numel * out).sum() <= np.floor(target * numel.sum() + 1e-9)
  assert out.min() >= 2 and out.max() <= 8 and _maximal(out, numel, target, 8)
