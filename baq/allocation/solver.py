"""Budgeted mixed-precision allocation: pick one bit-width per unit.

Given, for every unit u and every allowed bit-width c_k, a sensitivity
s[u, k] (the reduced importance of quantizing u at c_k; lower is better), the
exact problem is a multiple-choice knapsack:

    minimise   sum_u s[u, k_u]
    subject to sum_u numel_u * c_{k_u} <= target_bits * sum_u numel_u.

`solve` answers it exactly: by dynamic programming over the budget when the
costs, divided by their greatest common divisor, give a small table, and as
an integer linear program (scipy's HiGHS `milp`) otherwise, after a
Lagrangian reduction that removes every choice provably worse than a greedy
incumbent (on 1,000 units it leaves a few dozen choices for the ILP). Either way the
answer is checked in exact integer arithmetic and never exceeds the budget.
`quantile_assignment` is FairQuant's baseline: bit-widths by importance
quantile, then demoted to the budget.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_CHOICES = (2, 3, 4, 5, 6, 8)
_DP_MAX_CELLS = 20_000_000


METHODS = ("auto", "dp", "milp")  # exact; "auto": dp when its table is small


def _check(sensitivity, numel, choices, target_bits):
  s = np.asarray(sensitivity, np.float64)
  w = np.asarray(numel, np.int64)
  c = np.asarray(sorted(choices), np.int64)
  if s.ndim != 2 or s.shape != (len(w), len(c)):
    raise ValueError(f"sensitivity must be [units, choices] = [{len(w)}, {len(c)}], "
                     f"got {s.shape}.")
  if len(set(c.tolist())) != len(c) or c[0] < 1:
    raise ValueError(f"choices must be distinct positive bit-widths, got {list(choices)}.")
  if np.any(w <= 0):
    raise ValueError("every unit needs numel > 0.")
  if target_bits < c[0]:
    raise ValueError(f"Impossible budget: target_bits={target_bits} is below the smallest "
                     f"bit-width choice {int(c[0])}.")
  if not np.all(np.isfinite(s)):
    raise ValueError("sensitivity has non-finite entries.")
  # Budget in integer bits; the tiny slack absorbs float error in target*N.
  cap = int(math.floor(target_bits * int(w.sum()) + 1e-9))
  return s, w, c, cap


def solve(sensitivity, numel: Sequence[int], target_bits: float,
          choices: Sequence[int] = DEFAULT_CHOICES, method: str = "auto") -> np.ndarray:
  """Exact minimum-sensitivity allocation under an average-bit budget.

  Args:
    sensitivity: [units, len(choices)] cost of each choice (choices sorted
      ascending; columns follow that order).
    numel: weights per unit.
    target_bits: budget on the numel-weighted mean bit-width.
    choices: allowed integer bit-widths.
    method: "dp", "milp" or "auto" (dp when its table is small).

  Returns:
    int64 [units] bit-widths, weighted mean <= target_bits.

  Raises:
    ValueError: malformed input, or a budget below the smallest choice (no
      allocation can meet it).
  """
  s, w, c, cap = _check(sensitivity, numel, choices, target_bits)
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}. Valid: {', '.join(METHODS)}.")
  if cap >= int(w.sum()) * int(c[-1]):  # Budget not binding: best per unit.
    return c[np.argmin(s, 1)]
  g, room = _dp_table(w, c, cap)
  if method == "dp" or (method == "auto" and (room + 1) * len(w) <= _DP_MAX_CELLS):
    extra = (c - c[0])[None, :] * (w // g)[:, None]  # cost above the all-min floor
    k = _dp(s, extra, room)
  else:
    k = _reduced_milp(s, w, c, cap)
  bits = c[k]
  assert int((w * bits).sum()) <= cap, "allocation exceeds the budget"
  return bits


def _dp_table(w: np.ndarray, c: np.ndarray, cap: int) -> tuple[int, int]:
  """(cost unit, budget columns) of the DP: costs in units of gcd(numel)."""
  g = math.gcd(*[int(x) for x in w]) if len(w) > 1 else int(w[0])
  return g, (cap - int(w.sum()) * int(c[0])) // g


def auto_method(numel: Sequence[int], target_bits: float,
                choices: Sequence[int] = DEFAULT_CHOICES) -> str:
  """The method `solve(method="auto")` uses: "dp" when its table is small."""
  s, w, c, cap = _check(np.zeros((len(numel), len(choices))), numel, choices, target_bits)
  del s
  _, room = _dp_table(w, c, cap)
  return "dp" if (room + 1) * len(w) <= _DP_MAX_CELLS else "milp"


def _dp(s: np.ndarray, extra: np.ndarray, room: int) -> np.ndarray:
  """Multiple-choice knapsack by DP over the remaining budget (exact)."""
  n, K = s.shape
  best = np.zeros(room + 1)  # best[r]: min cost of units so far using <= r
  choice = np.zeros((n, room + 1), np.int8)
  for u in range(n):
    cand = np.full((K, room + 1), np.inf)
    for k in range(K):
      e = int(extra[u, k])
      if e <= room:
        cand[k, e:] = best[:room + 1 - e] + s[u, k]
    choice[u] = np.argmin(cand, 0)
    best = cand[choice[u], np.arange(room + 1)]
  out, r = np.zeros(n, np.int64), room
  for u in range(n - 1, -1, -1):
    out[u] = choice[u, r]
    r -= int(extra[u, out[u]])
  return out


def _lagrangian(s, w, c, cap, iters: int = 100):
  """A feasible allocation and the Lagrangian bound at the budget's multiplier.

  For lam >= 0, L(lam) = sum_u min_k (s_uk + lam w_u c_k) - lam cap is a
  lower bound on every feasible allocation's cost; bisection finds the
  smallest lam whose per-unit minimisers meet the budget (feasible, so an
  incumbent) and L there is within one unit's step of the optimum.
  """
  wc = w[:, None].astype(np.float64) * c[None, :]

  def pick(lam):
    return np.argmin(s + lam * wc, 1)

  def cost(k):
    return int((w * c[k]).sum())

  lo, hi = 0.0, 1.0
  while cost(pick(hi)) > cap:
    hi *= 4.0
    if hi > 1e300:
      raise ValueError("No allocation meets the budget.")
  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if cost(pick(mid)) <= cap else (mid, hi)
  k = pick(hi)
  # Greedy fill: spend what is left on the best affordable single upgrades.
  left = cap - cost(k)
  rows = np.arange(len(w))
  while True:
    extra = wc - wc[rows, k][:, None]
    gain = s[rows, k][:, None] - s
    ok = (extra > 0) & (extra <= left) & (gain > 0)
    if not ok.any():
      break
    u, j = np.unravel_index(np.argmax(np.where(ok, gain / np.maximum(extra, 1), -np.inf)),
                            s.shape)
    left -= int(extra[u, j])
    k[u] = j
  lagr = s + hi * wc
  bound = float(lagr.min(1).sum() - hi * cap)
  return k, bound, lagr - lagr.min(1, keepdims=True)


def _reduced_milp(s: np.ndarray, w: np.ndarray, c: np.ndarray, cap: int) -> np.ndarray:
  """Exact MCKP: Lagrangian variable fixing, then the ILP on what is left.

  Choice k of unit u can be in no allocation better than the incumbent when
  L + r_uk exceeds the incumbent's cost (r_uk >= 0 its reduced cost), since
  every feasible allocation containing it costs at least that much. Such
  choices are removed; units left with one choice are fixed; the ILP solves
  the rest exactly. Ties are never removed, so the optimum is kept.
  """
  k_inc, bound, reduced = _lagrangian(s, w, c, cap)
  best = float(s[np.arange(len(w)), k_inc].sum())
  tol = 1e-9 * max(abs(best), abs(bound), 1.0)
  allowed = bound + reduced <= best + tol
  allowed[np.arange(len(w)), k_inc] = True
  free = allowed.sum(1) > 1
  if not free.any():
    return k_inc
  k = k_inc.copy()
  fixed_cost = int((w[~free] * c[k_inc[~free]]).sum())
  sub_s = np.where(allowed[free], s[free], 0.0)  # excluded ones are bounded to 0
  k[free] = _milp(sub_s, w[free], c, cap - fixed_cost, allowed=allowed[free])
  if float(s[np.arange(len(w)), k].sum()) > best:  # cannot happen; keep the incumbent
    return k_inc
  return k


def _milp(s: np.ndarray, w: np.ndarray, c: np.ndarray, cap: int,
          allowed: np.ndarray | None = None) -> np.ndarray:
  """The same problem as a 0/1 integer program (HiGHS branch and bound)."""
  from scipy.optimize import Bounds, LinearConstraint, milp  # pylint: disable=import-outside-toplevel
  from scipy.sparse import csr_array  # pylint: disable=import-outside-toplevel
  n, K = s.shape
  rows = np.repeat(np.arange(n), K)
  one_each = csr_array((np.ones(n * K), (rows, np.arange(n * K))), shape=(n, n * K))
  cost = (w[:, None] * c[None, :]).ravel().astype(np.float64)
  upper = np.ones(n * K) if allowed is None else allowed.ravel().astype(np.float64)
  for margin in (0.0, 0.5, 1.0):  # Tighten if solver tolerance ever overshoots.
    res = milp(s.ravel(), integrality=np.ones(n * K), bounds=Bounds(0, upper),
               constraints=[LinearConstraint(one_each, 1, 1),
                            LinearConstraint(cost[None, :], -np.inf, cap - margin)],
               options={"mip_rel_gap": 0.0})
    if res.x is None:
      raise ValueError(f"No allocation meets the budget ({res.message}).")
    k = np.argmax(res.x.reshape(n, K), 1)
    if int((w * c[k]).sum()) <= cap:
      return k
  raise ValueError("The ILP solver's answer kept exceeding the budget.")


def quantile_assignment(importance, numel: Sequence[int], target_bits: float,
                        choices: Sequence[int] = DEFAULT_CHOICES) -> np.ndarray:
  """FairQuant's baseline: bit-width by importance quantile, then the budget.

  Units are ranked by importance and split into len(choices) equal-count
  quantile bins, the least important bin taking the smallest choice. While
  the weighted mean exceeds the budget, the least important unit that is not
  yet at the smallest choice is demoted one step; if no unit can be demoted
  further the budget is impossible (below the smallest choice).

  Args:
    importance: [units] reduced importance (higher: keep more bits).
    numel: weights per unit.
    target_bits: budget on the numel-weighted mean bit-width.
    choices: allowed bit-widths.

  Returns:
    int64 [units] bit-widths, weighted mean <= target_bits.
  """
  imp = np.asarray(importance, np.float64)
  s, w, c, cap = _check(np.zeros((len(imp), len(choices))), numel, choices, target_bits)
  del s
  ranks = np.argsort(np.argsort(imp, kind="stable"), kind="stable")
  k = np.minimum(ranks * len(c) // len(imp), len(c) - 1)
  order = np.argsort(imp, kind="stable")  # least important first
  excess = int((w * c[k]).sum()) - cap
  if excess <= 0:
    return c[k]
  # Demoting one step at a time the least important unit not yet at the
  # smallest choice takes units down to it whole, in importance order, until
  # the budget holds; so: whole units while their savings fall short of the
  # excess, then the fewest steps of the next one (no Python loop per step).
  saving = w[order] * (c[k[order]] - c[0])
  before = np.cumsum(saving) - saving
  j = int(np.searchsorted(np.cumsum(saving), excess))  # the unit that closes the gap
  k[order[:j]] = 0
  u, need = order[j], excess - int(before[j])
  steps = w[u] * (c[k[u]] - c[:k[u] + 1][::-1])  # savings of 0, 1, ... steps down
  k[u] -= int(np.argmax(steps >= need))
  return c[k]
