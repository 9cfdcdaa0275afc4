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
