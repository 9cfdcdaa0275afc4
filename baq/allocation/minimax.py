"""Exact minimax allocation: protect the worst group, not the worst entry.

`solver.solve` minimises one reduced sensitivity per (unit, choice); with the
`max` reducer that is sum_u max_g S[g, u, k_u], the sum of each unit's worst
group, which need not be the worst group's loss: different units may have
different worst groups, and no group ever pays all of them. The problem of
protecting the worst group is

    minimise   t
    subject to sum_u S[g, u, k_u] <= t                 for every group g,
               sum_u numel_u c_{k_u} <= floor(target_bits * sum_u numel_u),
               one choice k_u per unit,

where sum_u S[g, u, k_u] is the additive (first-order, per-unit) estimate of
group g's loss increase: each unit's increase measured or extrapolated with
every other unit float, and the units' increases summed, as HAWQ and
FairQuant's allocators assume. Its interactions are not modelled.

`solve_minimax` answers it exactly as a 0/1 integer program (binary
x[u, k], continuous t; scipy's HiGHS `milp`, zero relative gap), after the
LP relaxation's duals have removed every choice that provably cannot reach
a greedy incumbent (a Lagrangian bound, recomputed in numpy so it holds
whatever the LP's accuracy). It is far slower than the reduced knapsack:
the groups' rows make it a multi-dimensional knapsack whose bound HiGHS
closes by branching (about 2 s on 179 units and 20 s on 1,000, 6 choices
and 6 groups, on 2 CPU cores; `benchmarks/allocation.py`). The
worst case alone leaves many allocations tied (a unit that moves only the
groups below the worst one is free), so a second stage fixes the groups'
totals to at most t* + tie_tol and minimises the sum of all groups' totals
(the mean over groups, times G): among allocations with the same worst
group, the one best on average. `group_totals` gives each group's total of
an allocation (the worst of them is t*), for reports.

Numerics: every unit's row is shifted by its smallest entry over all groups
and choices (the same constant for every group, so the optimum and the
ranking of groups are unchanged; a per-group shift would compare each
group's increase above its own best case instead of its loss) and the whole
table divided by its largest entry, so the solver sees entries in [0, 1] and
its absolute tolerances (1e-6 to 1e-7) are relative to the largest single
unit's effect. The budget is checked in exact integer arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from baq.allocation import solver

TIE_TOL = 1e-9  # ties: worst-group totals within this of t*, in units of the largest entry
_SLACK = 1e-9  # float error of the bounds' sums, far below any solver tolerance


def group_totals(sensitivity, bits, choices: Sequence[int] = solver.DEFAULT_CHOICES
                 ) -> np.ndarray:
  """Each group's additive loss-increase estimate of an allocation.

  Args:
    sensitivity: [G, units, len(choices)] (columns in ascending choice order).
    bits: [units] bit-widths, each one of `choices`.
    choices: the allowed bit-widths.

  Returns:
    float64 [G]: sum_u sensitivity[g, u, k_u]; its max is the allocation's
    worst group (t* for `solve_minimax`'s answer).
  """
  s = np.asarray(sensitivity, np.float64)
  c = sorted(int(x) for x in choices)
  bits = np.asarray(bits).tolist()
  bad = sorted(set(bits) - set(c))
  if bad:
    raise ValueError(f"bits {bad} are not among the choices {c}.")
  k = np.asarray([c.index(b) for b in bits], np.int64)
  return s[:, np.arange(len(k)), k].sum(1)


def _check3(sensitivity, numel, choices, target_bits):
  """`solver._check` for every group of a [G, units, K] table."""
  s = np.asarray(sensitivity, np.float64)
  if s.ndim != 3 or s.shape[0] < 1:
    raise ValueError(f"sensitivity must be [groups, units, choices] with at least one group, "
                     f"got shape {s.shape}.")
  for g in range(s.shape[0]):
    try:
      _, w, c, cap = solver._check(s[g], numel, choices, target_bits)  # pylint: disable=protected-access
    except ValueError as e:
      raise ValueError(f"group {g}: {e}" if s.shape[0] > 1 else str(e)) from e
  return s, w, c, cap


def solve_minimax(sensitivity, numel: Sequence[int], target_bits: float,
                  choices: Sequence[int] = solver.DEFAULT_CHOICES,
                  tie_tol: float = TIE_TOL) -> np.ndarray:
  """Exact allocation minimising the worst group's summed sensitivity.

  Args:
    sensitivity: [G, units, len(choices)] estimated loss increase of group g
      when unit u is quantized at each choice (ascending choice order).
    numel: weights per unit.
    target_bits: budget on the numel-weighted mean bit-width.
    choices: allowed integer bit-widths.
    tie_tol: allocations whose worst-group total is within tie_tol of the
      optimum (in units of the table's largest entry after the shift) are
      tied; among them the smallest sum over groups wins.

  Returns:
    int64 [units] bit-widths, weighted mean <= target_bits.

  Raises:
    ValueError: malformed input (shapes, non-finite entries, choices,
      numel), or a budget below the smallest choice.
  """
  s, w, c, cap = _check3(sensitivity, numel, choices, target_bits)
  n = s.shape[1]
  shifted = s - s.min(axis=(0, 2))[None, :, None]
  scale = float(shifted.max())
  if scale == 0.0:  # every allocation is as good: the cheapest
    return np.full(n, c[0], np.int64)
  a = shifted / scale
  worst = lambda k: float(a[:, np.arange(n), k].sum(1).max())
  bound, reduced, k_inc = _lagrangian(a, w, c, cap)
  # Every choice with L + r above the incumbent is in no allocation as good
  # as it (nor tied with it): removed before the integer program.
  allowed = bound + reduced <= worst(k_inc) + tie_tol + _SLACK
  k1 = _reduced_milp(a, w, c, cap, allowed, k_inc, stage=1)
  t1 = worst(k1)
  k = k1
  try:
    k2 = _reduced_milp(a, w, c, cap, bound + reduced <= t1 + tie_tol + _SLACK, k1, stage=2,
                       t_max=t1 + tie_tol)
    if worst(k2) <= t1 + tie_tol:
      k = k2  # else HiGHS's row tolerance let a slightly worse one in: keep stage 1
  except ValueError:
    pass  # stage 1's answer is feasible for stage 2; this cannot happen
  bits = c[k]
  assert int((w * bits).sum()) <= cap, "allocation exceeds the budget"
  return bits


def _lagrangian(a: np.ndarray, w: np.ndarray, c: np.ndarray, cap: int):
  """A lower bound on t*, reduced costs and an incumbent, from the LP relaxation.

  For group weights lam >= 0 with sum <= 1 and a budget multiplier mu >= 0,
  every feasible allocation k has
    t(k) >= sum_g lam_g T_g(k) + mu (cost(k) - cap) = sum_u q[u, k_u] - mu cap,
  q[u, k] = sum_g lam_g a[g, u, k] + mu numel_u c_k; so with L = sum_u min q - mu
  cap and r = q - min_k q >= 0, any allocation that picks (u, k) has
  t >= L + r[u, k]. The LP's duals give the best lam and mu; the bound is
  recomputed here from them, so it holds whatever the LP's accuracy. The
  incumbent rounds the LP's fractional units (at most G + 1) down to the
  smallest bit-width they use, which keeps the budget.

  Returns:
    (L, r [units, K], incumbent choice indices [units]).
  """
  from scipy.optimize import linprog  # pylint: disable=import-outside-toplevel
  G, n, K = a.shape
  res = linprog(np.concatenate([np.zeros(n * K), [1.0]]), method="highs",
                A_ub=_rows(a, w, c, with_t=True), b_ub=np.concatenate([np.zeros(G), [cap]]),
                A_eq=_one_each(n, K, with_t=True), b_eq=np.ones(n),
                bounds=[(0, 1)] * (n * K) + [(0, None)])
  k_inc = np.zeros(n, np.int64)
  if res.status != 0:  # cannot happen for a valid budget; no fixing then
    return -np.inf, np.zeros((n, K)), k_inc
  lam = np.clip(-res.ineqlin.marginals[:G], 0.0, None)
  lam /= max(1.0, lam.sum())
  mu = max(0.0, -float(res.ineqlin.marginals[G]))
  q = np.einsum("g,guk->uk", lam, a) + mu * (w[:, None] * c[None, :]).astype(np.float64)
  bound = float(q.min(1).sum() - mu * cap)
  k_lp = np.argmax(res.x[:n * K].reshape(n, K) > 1e-9, 1)  # smallest bits in use
  if int((w * c[k_lp]).sum()) <= cap:
    k_inc = k_lp
  return bound, q - q.min(1, keepdims=True), _improve(a, w, c, cap, k_inc)


def _improve(a: np.ndarray, w: np.ndarray, c: np.ndarray, cap: int, k: np.ndarray) -> np.ndarray:
  """Greedy descent: the affordable one-unit change that lowers the worst
  group most, while one does (a better incumbent fixes more choices)."""
  n = len(k)
  k = k.copy()
  wc = w[:, None] * c[None, :]
  for _ in range(4 * n):
    rows = np.arange(n)
    totals = a[:, rows, k].sum(1)  # [G]
    new_worst = (totals[:, None, None] + a - a[:, rows, k][:, :, None]).max(0)  # [n, K]
    left = cap - int((w * c[k]).sum())
    ok = wc - wc[rows, k][:, None] <= left
    new_worst = np.where(ok, new_worst, np.inf)
    u, j = np.unravel_index(np.argmin(new_worst), new_worst.shape)
    if not new_worst[u, j] < totals.max() - 1e-12:
      break
    k[u] = j
  return k


def _one_each(n: int, K: int, with_t: bool):
  """[n, n K (+1)]: each unit's choices sum to one."""
  from scipy.sparse import csr_array  # pylint: disable=import-outside-toplevel
  nk = n * K
  return csr_array((np.ones(nk), (np.repeat(np.arange(n), K), np.arange(nk))),
                   shape=(n, nk + int(with_t)))


def _rows(a: np.ndarray, w: np.ndarray, c: np.ndarray, with_t: bool):
  """[G + 1, n K (+1)]: the groups' totals (minus t) and the budget's cost."""
  from scipy.sparse import csr_array  # pylint: disable=import-outside-toplevel
  G, n, K = a.shape
  m = np.concatenate([a.reshape(G, n * K), (w[:, None] * c[None, :]).reshape(1, n * K)])
  if with_t:
    m = np.concatenate([m, np.concatenate([-np.ones(G), [0.0]])[:, None]], 1)
  return csr_array(m)


def _reduced_milp(a: np.ndarray, w: np.ndarray, c: np.ndarray, cap: int, allowed: np.ndarray,
                  k_fallback: np.ndarray, stage: int, t_max: float = np.inf) -> np.ndarray:
  """One stage as a HiGHS integer program over the choices still allowed.

  Units left with one allowed choice are fixed (their totals and cost move
  to the right-hand sides); the fallback's choices are always allowed, so
  the program stays feasible. Stage 1 minimises t over the groups' rows;
  stage 2 caps the rows at t_max and minimises their sum.

  Returns:
    int64 [units] choice indices.
  """
  from scipy.optimize import Bounds, LinearConstraint, milp  # pylint: disable=import-outside-toplevel
  G, n, K = a.shape
  allowed = allowed.copy()
  allowed[np.arange(n), k_fallback] = True
  free = allowed.sum(1) > 1
  k = np.where(free, 0, np.argmax(allowed, 1))
  if not free.any():
    return k
  fixed = ~free
  offset = a[:, fixed, k[fixed]].sum(1)  # [G]
  room = cap - int((w[fixed] * c[k[fixed]]).sum())
  af, wf, nf = a[:, free], w[free], int(free.sum())
  with_t = stage == 1
  rows = _rows(af, wf, c, with_t)
  if with_t:
    obj, top = np.concatenate([np.zeros(nf * K), [1.0]]), -offset
  else:
    obj, top = af.sum(0).ravel(), t_max - offset
  upper = np.concatenate([allowed[free].ravel().astype(np.float64), [np.inf] * int(with_t)])
  integrality = np.concatenate([np.ones(nf * K), np.zeros(int(with_t))])
  for margin in (0.0, 0.5, 1.0):  # Tighten if the solver's tolerance ever overshoots.
    res = milp(obj, integrality=integrality, bounds=Bounds(0, upper),
               constraints=[LinearConstraint(_one_each(nf, K, with_t), 1, 1),
                            LinearConstraint(rows, -np.inf,
                                             np.concatenate([top, [room - margin]]))],
               options={"mip_rel_gap": 0.0})
    if res.x is None:
      raise ValueError(f"No allocation meets the budget ({res.message}).")
    k[free] = np.argmax(res.x[:nf * K].reshape(nf, K), 1)
    if int((w * c[k]).sum()) <= cap:
      return k
  raise ValueError("The ILP solver's answer kept exceeding the budget.")
