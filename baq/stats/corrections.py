"""Multiple-testing corrections and the verdicts drawn from adjusted p-values.

A bias study tests every (setting, group) pair (`baq.stats.significance`), so its
p-values are adjusted as one family (`adjust`: Holm's step-down for the
family-wise error, Benjamini-Hochberg for the false discovery rate, or none)
before `verdicts` calls a group's accuracy change amplified, reduced or not
significant. Pure numpy functions; NaN p-values (empty groups) are skipped.
"""

from __future__ import annotations

import numpy as np

VERDICTS = ("amplified", "reduced", "no significant change")


def _stepwise(p, step) -> np.ndarray:
  """`step` (ascending p-values -> adjusted) over the non-NaN p-values, capped at 1."""
  p = np.asarray(p, np.float64)
  out, ok = np.full_like(p, np.nan), np.flatnonzero(~np.isnan(p))
  if ok.size:
    order = ok[np.argsort(p[ok], kind="stable")]
    out[order] = np.minimum(step(p[order], np.arange(1, ok.size + 1)), 1.0)
  return out


def holm(p) -> np.ndarray:
  """Holm's step-down adjusted p-values (family-wise error).

  Args:
    p: the family's p-values; NaNs are skipped and stay NaN.

  Returns:
    The adjusted p-values, in the order of `p`.
  """
  return _stepwise(p, lambda q, i: np.maximum.accumulate((q.size - i + 1) * q))


def benjamini_hochberg(p) -> np.ndarray:
  """Benjamini-Hochberg adjusted p-values (false discovery rate).

  Args:
    p: the family's p-values; NaNs are skipped and stay NaN.

  Returns:
    The adjusted p-values, in the order of `p`.
  """
  return _stepwise(p, lambda q, i: np.minimum.accumulate((q * q.size / i)[::-1])[::-1])


CORRECTIONS = {"holm": holm, "bh": benjamini_hochberg,
               "none": lambda p: np.asarray(p, np.float64)}


def adjust(p, method: str = "holm") -> np.ndarray:
  """Adjusted p-values by `method`.

  Args:
    p: the family's p-values (NaNs are left as NaN).
    method: holm, bh or none.

  Returns:
    The adjusted p-values, in the order of `p`.

  Raises:
    ValueError: an unknown method (the message lists the valid ones).
  """
  if method not in CORRECTIONS:
    raise ValueError(f"Unknown correction {method!r}. Valid: {', '.join(CORRECTIONS)}.")
  return CORRECTIONS[method](p)


def verdicts(change, change_p, relative, relative_p, alpha: float = 0.05,
             rule: str = "differential") -> list[str]:
  """One of VERDICTS per (setting, group), from adjusted p-values.

  Rules:
    differential: "amplified" when relative_g < 0 with adjusted p < alpha
      (the group's change vs float is significantly worse than the whole
      test set's: quantization moved accuracy away from this group);
      "reduced" when relative_g > 0 significantly.
    strict: the group's own change vs float must also be significant and of
      the same sign: "amplified" = significant drop AND significantly larger
      than overall; "reduced" = significant gain AND significantly larger.
  Anything else is "no significant change" (NaN p-values included).

  Args:
    change: each pair's change vs float.
    change_p: its adjusted p-value.
    relative: each pair's change minus the overall change.
    relative_p: its adjusted p-value.
    alpha: the significance level the adjusted p-values are held to.
    rule: differential or strict.

  Returns:
    A list of verdict strings, one per pair.
  """
  if rule not in ("differential", "strict"):
    raise ValueError(f"Unknown verdict rule {rule!r}. Valid: differential, strict.")
  change, relative = np.asarray(change, float), np.asarray(relative, float)
  sig_rel = np.nan_to_num(np.asarray(relative_p, float), nan=1.0) < alpha
  sig_chg = np.nan_to_num(np.asarray(change_p, float), nan=1.0) < alpha
  amp, red = sig_rel & (relative < 0), sig_rel & (relative > 0)
  if rule == "strict":
    amp, red = amp & sig_chg & (change < 0), red & sig_chg & (change > 0)
  return [VERDICTS[0] if a else VERDICTS[1] if r else VERDICTS[2] for a, r in zip(amp, red)]
