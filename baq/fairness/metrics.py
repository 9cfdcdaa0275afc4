"""Accuracy and group-fairness metrics of predictions, and the report table.

All functions take host numpy arrays of predictions, labels and group ids.
Fairness gaps are computed for a *positive class* (e.g. malignant) treated as
the positive decision: demographic parity compares how often each group is
predicted positive, equal opportunity compares true-positive rates, and
equalized odds takes the larger of the true- and false-positive-rate gaps.
Groups without the examples a rate needs are left out of that gap.
`skew_at_k` measures how a ranking over-represents or under-represents
groups (MaxSkew@k / MinSkew@k).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np


def _rate(hits: np.ndarray, mask: np.ndarray, groups: np.ndarray, num_groups: int):
  num = np.bincount(groups[mask], weights=hits[mask], minlength=num_groups)
  den = np.bincount(groups[mask], minlength=num_groups).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def _spread(rates: np.ndarray) -> float:
  valid = rates[~np.isnan(rates)]
  return float(valid.max() - valid.min()) if valid.size > 1 else 0.0


def classification_metrics(
    predictions: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    num_groups: int,
    positive_class: int = 1,
) -> dict:
  """Accuracy, per-group accuracy and group-fairness gaps.

  Args:
    predictions: [N] predicted class ids.
    labels: [N] true class ids.
    groups: [N] group ids in [0, num_groups).
    num_groups: G.
    positive_class: class treated as the positive decision for DP/EOpp/EOdds.

  Returns:
    dict with accuracy, group_accuracy (list, NaN for empty groups),
    group_count, worst_group_accuracy, worst_group, best_group_accuracy,
    accuracy_gap (best minus worst), demographic_parity_gap,
    equal_opportunity_gap, equalized_odds_gap.
  """
  predictions, labels, groups = (np.asarray(a).astype(np.int64)
                                 for a in (predictions, labels, groups))
  everyone = np.ones_like(labels, bool)
  correct = (predictions == labels).astype(np.float64)
  group_acc = _rate(correct, everyone, groups, num_groups)
  pred_pos = (predictions == positive_class).astype(np.float64)
  tpr = _rate(pred_pos, labels == positive_class, groups, num_groups)
  fpr = _rate(pred_pos, labels != positive_class, groups, num_groups)
  valid = ~np.isnan(group_acc)
  worst = int(np.nanargmin(group_acc))
  return {
      "accuracy": float(correct.mean()),
      "group_accuracy": [None if np.isnan(a) else float(a) for a in group_acc],
      "group_count": np.bincount(groups, minlength=num_groups).tolist(),
      "worst_group_accuracy": float(group_acc[worst]),
      "worst_group": worst,
      "best_group_accuracy": float(np.max(group_acc[valid])),
      "accuracy_gap": _spread(group_acc),
      "demographic_parity_gap": _spread(_rate(pred_pos, everyone, groups, num_groups)),
      "equal_opportunity_gap": _spread(tpr),
      "equalized_odds_gap": max(_spread(tpr), _spread(fpr)),
  }


TABLE_COLUMNS = (
    ("accuracy", "acc", 100.0, "{:6.2f}"),
    ("worst_group_accuracy", "worst", 100.0, "{:6.2f}"),
    ("accuracy_gap", "gap", 100.0, "{:6.2f}"),
    ("demographic_parity_gap", "DP", 100.0, "{:6.2f}"),
    ("equal_opportunity_gap", "EOpp", 100.0, "{:6.2f}"),
    ("equalized_odds_gap", "EOdds", 100.0, "{:6.2f}"),
    ("avg_bits", "bits", 1.0, "{:6.2f}"),
    ("size_bytes", "KiB", 1 / 1024, "{:8.1f}"),
)


def format_table(methods: Mapping[str, Mapping], group_names: Optional[Sequence[str]] = None) -> str:
  """A fixed-width text table: one row per method, percentages for rates.

  Args:
    methods: name -> metrics dict (from `classification_metrics` plus avg_bits
      and size_bytes).
    group_names: optional names of groups, for per-group accuracy columns.

  Returns:
    The table as a string.
  """
  name_w = max([len("method")] + [len(n) for n in methods])
  header = ["method".ljust(name_w)] + [h.rjust(8) for _, h, _, _ in TABLE_COLUMNS]
  n_groups = max((len(m.get("group_accuracy", [])) for m in methods.values()), default=0)
  names = list(group_names or [f"g{i}" for i in range(n_groups)])[:n_groups]
  header += [n[:7].rjust(8) for n in names]
  lines = [" ".join(header), "-" * len(" ".join(header))]
  for name, m in methods.items():
    row = [name.ljust(name_w)]
    for key, _, mult, fmt in TABLE_COLUMNS:
      v = m.get(key)
      row.append((fmt.format(v * mult) if v is not None else "-").rjust(8))
    for a in m.get("group_accuracy", []):
      row.append(("-" if a is None else f"{100 * a:6.2f}").rjust(8))
    lines.append(" ".join(row))
  return "\n".join(lines)


def skew_at_k(scores, groups, num_groups: int, k: int, smoothing: float = 0.5,
              desired: Optional[np.ndarray] = None) -> dict:
  """Skew@k of a ranking over groups (Geyik et al., 2019), MaxSkew and MinSkew.

  skew_g@k = log(p_g,k / p_g,desired), where p_g,k is group g's share of the
  top k by score (descending; ties keep index order) and p_g,desired its
  share of the ranked population (or `desired`). Zero counts: the top-k
  shares are smoothed additively, p_g,k = (c_g + s) / (k + s G'), over the
  G' groups present in the population (s = `smoothing`; s = 0 is the plain
  formula, which gives -inf for an absent group). Groups absent from the
  population get NaN and are left out of Max/MinSkew.

  Returns:
    dict(skew [G] list, max_skew, min_skew, max_group, min_group, k).
  """
  scores, groups = np.asarray(scores, np.float64), np.asarray(groups)
  k = int(min(k, scores.size))
  top = np.argsort(-scores, kind="stable")[:k]
  pop = np.bincount(groups, minlength=num_groups).astype(np.float64)
  present = pop > 0
  want = pop / pop.sum() if desired is None else np.asarray(desired, np.float64)
  c = np.bincount(groups[top], minlength=num_groups).astype(np.float64)
  share = (c + smoothing) / (k + smoothing * present.sum())
  with np.errstate(divide="ignore"):
    skew = np.where(present, np.log(share) - np.log(np.where(present, want, 1.0)), np.nan)
  hi, lo = int(np.nanargmax(skew)), int(np.nanargmin(skew))
  return dict(skew=skew.tolist(), max_skew=float(skew[hi]), min_skew=float(skew[lo]),
              max_group=hi, min_group=lo, k=k)
