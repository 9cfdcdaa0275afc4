"""Integer bit-widths nearest to searched continuous ones, under the budget: exact.

`deploy` gives a model's parameters at those integer bits (training's
finalize step, the export and the study all deploy through it).

BAQ searches continuous bit-widths b; deployment needs integers B in
[min_bits, max_bits] whose numel-weighted mean meets the budget. `nearest`
solves

    min_B  sum_u numel_u (B_u - b_u)^2   s.t.  sum_u numel_u B_u <= target * sum_u numel_u

exactly, as the multiple-choice knapsack of `solver.solve` (dynamic
programming or Lagrangian fixing + ILP), and with `spend` then raises units
one bit at a time while one more bit fits, the unit whose squared distance
grows least first, so that no unit below max_bits could take one more bit
within the budget. (baq's earlier projection shifted every unit by one
common offset, rounded and spent greedily; it was not the minimiser and could
leave most of a bit unused: tests/test_projection.py holds the cases.)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from baq.allocation import solver
from baq.quant import units


def nearest(bits: Sequence[float], numel: Sequence[int], target_bits: float,
            min_bits: int, max_bits: int, spend: bool = False,
            method: str = "auto") -> np.ndarray:
  """The integer allocation nearest to `bits` (numel-weighted squares) that meets the budget.

  Args:
    bits: continuous bit-widths, one per unit.
    numel: weights per unit.
    target_bits: the numel-weighted average-bit budget.
    min_bits: lowest integer bit-width.
    max_bits: highest integer bit-width.
    spend: then spend what is left of the budget, one bit at a time.
    method: `solver.solve`'s method ("auto", "dp" or "milp").

  Returns:
    int64 [units] bit-widths; their weighted mean never exceeds the target.

  Raises:
    ValueError: the budget is not finite or below min_bits.
  """
  units.check_budget(target_bits, min_bits, max(max_bits, target_bits))
  b = np.asarray(bits, np.float64)
  w = np.asarray(numel, np.int64)
  choices = np.arange(int(min_bits), int(max_bits) + 1)
  cost = w[:, None] * np.square(choices[None, :] - b[:, None])
  out = solver.solve(cost, w, min(target_bits, float(max_bits)), choices, method=method)
  if spend:
    out = spend_remainder(out, b, w, target_bits, int(max_bits))
  return out.astype(np.int64)


def spend_remainder(out: np.ndarray, bits: np.ndarray, numel: np.ndarray,
                    target_bits: float, max_bits: int) -> np.ndarray:
  """Raises units one bit at a time while one fits, least squared-distance growth first.

  Raising B_u by one grows numel_u (B_u + 1 - b_u)^2 - numel_u (B_u - b_u)^2
  = numel_u (2 (B_u - b_u) + 1); the unit whose growth per budget bit,
  2 (B_u - b_u) + 1, is smallest goes first.
  """
  out = np.array(out, np.int64)
  cap = int(np.floor(target_bits * int(numel.sum()) + 1e-9))
  while True:
    left = cap - int((numel * out).sum())
    room = (out < max_bits) & (numel <= left)
    if not room.any():
      return out
    out[np.argmin(np.where(room, 2.0 * (out - bits) + 1.0, np.inf))] += 1


def measured(loss_at: Callable[[np.ndarray], float], bits: Sequence[float],
             numel: Sequence[int], target_bits: float, min_bits: int, max_bits: int,
             rounds: int = 2, method: str = "auto") -> np.ndarray:
  """Integer bits chosen by the loss they measure, around the searched ones.

  Starts at `nearest(..., spend=True)`. Each round measures, for every unit
  u and bit-width k in [min_bits, max_bits], `loss_at` of the allocation
  with u at k and every other unit where it is, and solves the budgeted
  multiple-choice knapsack on those costs exactly (`solver.solve`); what is
  left of the budget is then spent one bit at a time, the unit whose
  measured loss grows least first. It stops after `rounds` rounds or when
  the allocation no longer changes. The costs are exact where the loss is
  additive over units, so the result is then the best allocation; in
  general it is the exact solution of the loss's coordinate-wise model
  around the current allocation (L x K evaluations per round).

  Args:
    loss_at: int64 [units] bits -> the loss to minimise (e.g. the worst
      group's calibration loss of the model at those bits).
    bits: the searched continuous bit-widths.
    numel: weights per unit.
    target_bits: the numel-weighted average-bit budget.
    min_bits: lowest integer bit-width.
    max_bits: highest integer bit-width.
    rounds: measure-and-solve rounds.
    method: `solver.solve`'s method.

  Returns:
    int64 [units] bit-widths meeting the budget; no unit below max_bits
    could take one more bit within it.
  """
  w = np.asarray(numel, np.int64)
  choices = np.arange(int(min_bits), int(max_bits) + 1)
  out = nearest(bits, w, target_bits, min_bits, max_bits, spend=True, method=method)
  cap = int(np.floor(target_bits * int(w.sum()) + 1e-9))
  for _ in range(rounds):
    cost = np.empty((len(w), len(choices)))
    for u in range(len(w)):
      for j, k in enumerate(choices):
        trial = out.copy()
        trial[u] = k
        cost[u, j] = float(loss_at(trial))
    new = solver.solve(cost, w, min(target_bits, float(max_bits)), choices,
                       method=method).astype(np.int64)
    while True:  # spend what is left, cheapest measured step first
      left = cap - int((w * new).sum())
      room = (new < max_bits) & (w <= left)
      if not room.any():
        break
      step = np.where(room, cost[np.arange(len(w)), np.minimum(new + 1, max_bits) - min_bits]
                      - cost[np.arange(len(w)), new - min_bits], np.inf)
      new[np.argmin(step)] += 1
    if np.array_equal(new, out):
      break
    out = new
  return out


def deploy(params: Any, layers: list[units.LayerUnits], target_bits: float,
           min_bits: int, max_bits: int) -> tuple[np.ndarray, Any]:
  """Integer bit-widths meeting the budget, and params that hold them.

  The continuous bits are projected onto the budget (`nearest`, exact) and
  what is left of it is spent as well. Bits that are already integers
  within [min_bits, max_bits] meeting the budget (an exact allocation, or a
  BAQ run past its finalize step) are kept as they are.
  """
  cont = np.asarray(units.gather_bits(params, layers))
  numel = units.unit_numels(layers)
  if (np.all(cont == np.round(cont)) and np.all((cont >= min_bits) & (cont <= max_bits))
      and (numel * cont).sum() <= target_bits * numel.sum() + 1e-9 * numel.sum()):
    ints = cont.astype(np.int64)
    return ints, units.scatter_bits(params, layers, ints)
  ints = nearest(cont, numel, target_bits, min_bits, max_bits, spend=True)
  return ints, units.scatter_bits(params, layers, ints)
