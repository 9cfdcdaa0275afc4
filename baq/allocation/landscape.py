"""Every integer allocation of a few units at a budget: the brute-force landscape.

An allocator can only be judged against what was possible. For a model with
a handful of layer units, `maximal` lists every integer allocation from
`choices` that meets an average-bit budget and wastes none of it (no unit
could move up to its next choice within the budget); `baq.experiment.exhaustive`
scores each after round-to-nearest and places the allocators' choices in
that distribution.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

MAX_ALLOCATIONS = 2_000_000  # choices ** units enumerated at most


def maximal(numel: Sequence[int], target_bits: float, choices: Sequence[int]) -> np.ndarray:
  """[M, units] allocations meeting the budget that no single step up could still meet.

  Args:
    numel: weights per unit.
    target_bits: the numel-weighted average-bit budget.
    choices: candidate integer bit-widths.

  Returns:
    int64 [M, units], in lexicographic order of the choices.

  Raises:
    ValueError: too many allocations to enumerate, or none fits.
  """
  w = np.asarray(numel, np.int64)
  c = np.asarray(sorted(set(int(x) for x in choices)), np.int64)
  total = len(c) ** len(w)
  if total > MAX_ALLOCATIONS:
    raise ValueError(f"{len(c)} choices over {len(w)} units make {total} allocations, over "
                     f"the {MAX_ALLOCATIONS} this enumerates; use fewer units or choices.")
  cap = int(np.floor(target_bits * int(w.sum()) + 1e-9))
  idx = np.asarray(list(itertools.product(range(len(c)), repeat=len(w))), np.int64)
  idx = idx.reshape(-1, len(w))
  spent = (c[idx] * w).sum(1)
  fits = spent <= cap
  nxt = np.minimum(idx + 1, len(c) - 1)
  step = np.where(idx + 1 < len(c), (c[nxt] - c[idx]) * w, np.iinfo(np.int64).max // 4)
  keep = fits & np.all(spent[:, None] + step > cap, axis=1)
  if not keep.any():
    raise ValueError(f"No allocation from choices {c.tolist()} meets {target_bits} bits.")
  return c[idx[keep]]


def rank_of(scores: np.ndarray, value: float) -> dict:
  """Where `value` falls among `scores` (higher is better)."""
  scores = np.asarray(scores, np.float64)
  return dict(better_than=float(np.mean(scores < value)),
              rank=int(np.sum(scores > value)) + 1, of=int(scores.size))


def is_maximal(bits: np.ndarray, numel: Sequence[int], target_bits: float,
               choices: Sequence[int]) -> bool:
  """Whether `bits` meets the budget and no single unit could step up within it."""
  w = np.asarray(numel, np.int64)
  c = np.asarray(sorted(set(int(x) for x in choices)), np.int64)
  cap = int(np.floor(target_bits * int(w.sum()) + 1e-9))
  idx = np.searchsorted(c, np.asarray(bits, np.int64))
  spent = int((c[idx] * w).sum())
  up = idx + 1 < len(c)
  step = (c[np.minimum(idx + 1, len(c) - 1)] - c[idx]) * w
  return spent <= cap and not np.any(up & (spent + step <= cap))


def random_maximal(numel: Sequence[int], target_bits: float, choices: Sequence[int],
                   rng: np.random.Generator) -> np.ndarray:
  """A random allocation that meets the budget and wastes none of it.

  Every unit starts at a uniformly drawn choice; random units step down one
  choice until the budget holds, then random units that still fit step up
  one choice until none does (so the result is in `maximal`'s set, for any
  number of units).

  Args:
    numel: weights per unit.
    target_bits: the numel-weighted average-bit budget.
    choices: candidate integer bit-widths.
    rng: the generator drawn from.

  Returns:
    int64 [units] bit-widths.

  Raises:
    ValueError: not even the lowest choice everywhere meets the budget.
  """
  w = np.asarray(numel, np.int64)
  c = np.asarray(sorted(set(int(x) for x in choices)), np.int64)
  cap = int(np.floor(target_bits * int(w.sum()) + 1e-9))
  if int(c[0] * w.sum()) > cap:
    raise ValueError(f"No allocation from choices {c.tolist()} meets {target_bits} bits.")
  idx = rng.integers(0, len(c), size=w.size)
  while (c[idx] * w).sum() > cap:
    down = np.flatnonzero(idx > 0)
    idx[rng.choice(down)] -= 1
  while True:
    spent = int((c[idx] * w).sum())
    up = np.flatnonzero((idx + 1 < len(c)) &
                        (spent + (c[np.minimum(idx + 1, len(c) - 1)] - c[idx]) * w <= cap))
    if up.size == 0:
      return c[idx]
    idx[rng.choice(up)] += 1


def fill_budget(bits: np.ndarray, numel: Sequence[int], target_bits: float,
                choices: Sequence[int], gain: np.ndarray) -> np.ndarray:
  """`bits` raised, one choice at a time, until no unit fits: a maximal allocation.

  Each step raises the unit whose next choice gains most per weight-bit spent
  (`gain[u, k]`: what moving unit u from choice k to k+1 is worth; ties to
  the lower index). With a table that never worsens as bits grow, raising a
  unit cannot worsen any allocator's objective, so an optimal allocation
  stays optimal and none of the budget is left unspent.

  Args:
    bits: int [units] allocation within the budget.
    numel: weights per unit.
    target_bits: the numel-weighted average-bit budget.
    choices: candidate integer bit-widths.
    gain: [units, len(choices)] (last column unused).

  Returns:
    int64 [units], `is_maximal`.
  """
  w = np.asarray(numel, np.int64)
  c = np.asarray(sorted(set(int(x) for x in choices)), np.int64)
  cap = int(np.floor(target_bits * int(w.sum()) + 1e-9))
  idx = np.searchsorted(c, np.asarray(bits, np.int64))
  gain = np.asarray(gain, np.float64)
  while True:
    spent = int((c[idx] * w).sum())
    nxt = np.minimum(idx + 1, len(c) - 1)
    cost = (c[nxt] - c[idx]) * w
    ok = (idx + 1 < len(c)) & (spent + cost <= cap)
    if not ok.any():
      return c[idx]
    value = np.where(ok, gain[np.arange(w.size), idx] / np.maximum(cost, 1), -np.inf)
    idx[int(np.argmax(value))] += 1
