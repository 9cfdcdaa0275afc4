"""The brute-force landscape of integer allocations, against a recursive enumeration."""

import numpy as np
import pytest

from baq.allocation import landscape


def _recursive(numel, cap, choices):
  """Every allocation (by recursion) that fits `cap` budget bits and admits no step up."""
  out = []

  def go(prefix):
    if len(prefix) == len(numel):
      spent = sum(n * b for n, b in zip(numel, prefix))
      if spent > cap:
        return
      for u, b in enumerate(prefix):
        i = choices.index(b)
        if i + 1 < len(choices) and spent + numel[u] * (choices[i + 1] - b) <= cap:
          return
      out.append(tuple(prefix))
      return
    for b in choices:
      go(prefix + [b])

  go([])
  return sorted(out)


@pytest.mark.parametrize("seed", range(6))
def test_maximal_allocations_are_exactly_the_budget_filling_ones(seed):
  rng = np.random.default_rng(seed)
  numel = rng.integers(1, 60, rng.integers(2, 5)).tolist()
  choices = sorted(rng.choice(np.arange(2, 9), rng.integers(2, 5), replace=False).tolist())
  target = float(rng.uniform(choices[0], choices[-1]))
  cap = int(np.floor(target * sum(numel) + 1e-9))
  want = _recursive(numel, cap, choices)
  if not want:
    with pytest.raises(ValueError, match="No allocation"):
      landscape.maximal(numel, target, choices)
    return
  got = sorted(map(tuple, landscape.maximal(numel, target, choices).tolist()))
  assert got == want


def test_maximal_refuses_too_many_allocations():
  with pytest.raises(ValueError, match="allocations, over"):
    landscape.maximal([10] * 12, 4.0, range(2, 9))


def test_rank_of_places_a_value_among_scores():
  r = landscape.rank_of(np.array([0.1, 0.5, 0.3, 0.9]), 0.5)
  assert r == dict(better_than=0.5, rank=2, of=4)
