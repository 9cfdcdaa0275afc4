"""Statistics of a quantization bias study: pure numpy/scipy functions.

Every test here compares a quantized model with the float model on the *same*
test examples, from per-example correctness (0/1). With several training
seeds the correctness arrays are [S, n] (seed s of the quantized model against
seed s of the float model) and an example's value is its mean over seeds, so
the bootstrap resamples test examples and keeps each example's seeds
together. Inference is then about the test population for these trained
seeds; `across_seeds` is the (weak, few-seed) test over training randomness.

Definitions, for group g (n_g examples, weight w_g = n_g / n):
  change_g    = acc_g(quantized) - acc_g(float), seeds averaged.
  overall     = sum_g w_g change_g (the whole test set's change).
  relative_g  = change_g - overall = (1 - w_g) (change_g - change_rest); it is
                negative when g loses more accuracy than the rest of the set.
Bootstrap replicates resample examples within each group (stratified, so the
w_g stay fixed); p-values are two-sided Wald tests with the bootstrap
standard error, falling back to an exact sign test when that error is 0.
Corrections over many tests and the verdicts drawn from them are in
`baq.stats.corrections`.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats as sps

def _per_example(correct) -> np.ndarray:
  """[n] seed-mean of [n] or [S, n] values."""
  c = np.asarray(correct, np.float64)
  return c if c.ndim == 1 else c.mean(axis=0)


def bootstrap_group_means(values, groups, num_groups: int, num_samples: int = 2000,
                          seed: int = 0) -> np.ndarray:
  """[B, G] means of `values` over examples resampled within each group.

  Resampling n_g examples with replacement and summing is the same as drawing
  how often each distinct value is taken from a multinomial with the
  observed frequencies; the values of a study are few (k / S for S seeds),
  so this costs O(B x distinct values), not O(B x n). Empty groups give NaN.

  Args:
    values: [n] per-example values.
    groups: [n] group ids in [0, num_groups).
    num_groups: G.
    num_samples: B bootstrap replicates.
    seed: numpy seed.

  Returns:
    [B, G] replicate means.
  """
  values, groups = np.asarray(values, np.float64), np.asarray(groups)
  rng = np.random.default_rng(seed)
  out = np.full((num_samples, num_groups), np.nan)
  for g in range(num_groups):
    v = values[groups == g]
    if v.size:
      uniq, counts = np.unique(v, return_counts=True)
      draws = rng.multinomial(v.size, counts / v.size, size=num_samples)
      out[:, g] = draws @ uniq / v.size
  return out


def _ci(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
  """Percentile interval per column (NaN for an empty group's column)."""
  tail = 100 * (1 - level) / 2
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
    return (np.nanpercentile(reps, tail, axis=0), np.nanpercentile(reps, 100 - tail, axis=0))


def group_accuracy_ci(correct, groups, num_groups: int, num_samples: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict:
  """Per-group and overall accuracy with percentile bootstrap intervals.

  Args:
    correct: [n] or [S, n] 0/1 correctness (seeds averaged per example).
    groups: [n] group ids.
    num_groups: G.
    num_samples: bootstrap replicates.
    level: confidence level of the intervals.
    seed: numpy seed of the resampling.

  Returns:
    dict of [G] lists accuracy, low, high, count, and overall, overall_low,
    overall_high (stratified: the group weights stay fixed). NaN for empty
    groups.
  """
  v, groups = _per_example(correct), np.asarray(groups)
  count = np.bincount(groups, minlength=num_groups)
  reps = bootstrap_group_means(v, groups, num_groups, num_samples, seed)
  acc = np.array([v[groups == g].mean() if count[g] else np.nan for g in range(num_groups)])
  w = count / count.sum()
  overall_reps = np.nansum(reps * w, axis=1)
  lo, hi = _ci(reps, level)
  olo, ohi = _ci(overall_reps[:, None], level)
  return dict(accuracy=acc.tolist(), low=lo.tolist(), high=hi.tolist(), count=count.tolist(),
              overall=float(v.mean()), overall_low=float(olo[0]), overall_high=float(ohi[0]))


def sign_test(diff) -> float:
  """Exact two-sided sign test of per-example differences (zeros dropped).

  Args:
    diff: per-example differences.

  Returns:
    The p-value (1 when every difference is zero).
  """
  d = np.asarray(diff)
  pos, neg = int(np.sum(d > 0)), int(np.sum(d < 0))
  return 1.0 if pos + neg == 0 else float(sps.binomtest(pos, pos + neg, 0.5).pvalue)


def mcnemar_exact(correct_float, correct_quant) -> dict:
  """Exact McNemar test of two classifiers on the same examples.

  b = examples the float model gets right and the quantized one wrong, c the
  reverse; under H0 (equal accuracy) b ~ Binomial(b + c, 1/2).

  Returns:
    dict(b, c, p_value): two-sided exact binomial p-value (1 when b + c = 0).
  """
  f = np.asarray(correct_float).astype(bool)
  q = np.asarray(correct_quant).astype(bool)
  b, c = int(np.sum(f & ~q)), int(np.sum(~f & q))
  return dict(b=b, c=c, p_value=1.0 if b + c == 0 else float(sps.binomtest(b, b + c, 0.5).pvalue))


def _wald_p(est: np.ndarray, se: np.ndarray, fallback: np.ndarray) -> np.ndarray:
  with np.errstate(all="ignore"):
    p = 2 * sps.norm.sf(np.abs(est / se))
  return np.where(se > 0, p, fallback)


def paired_change(correct_quant, correct_float, groups, num_groups: int,
                  num_samples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
  """Paired bootstrap of the accuracy change, per group and relative to overall.

  Args:
    correct_quant: [n] or [S, n] correctness of the quantized model(s).
    correct_float: the float model(s), same shape, same examples (and seeds).
    groups: [n] group ids.
    num_groups: G.
    num_samples: bootstrap replicates (examples resampled within groups).
    level: confidence level.
    seed: numpy seed.

  Returns:
    dict of [G] lists change, change_low, change_high, change_se, change_p,
    relative, relative_low, relative_high, relative_se, relative_p, and
    scalars overall, overall_low, overall_high, overall_se, overall_p (see
    the module docstring). NaN for empty groups.
  """
  diff = _per_example(correct_quant) - _per_example(correct_float)
  groups = np.asarray(groups)
  count = np.bincount(groups, minlength=num_groups)
  w = count / count.sum()
  reps = bootstrap_group_means(diff, groups, num_groups, num_samples, seed)
  change = np.array([diff[groups == g].mean() if count[g] else np.nan
                     for g in range(num_groups)])
  overall = float(diff.mean())
  overall_reps = np.nansum(reps * w, axis=1)
  rel_reps = reps - overall_reps[:, None]
  relative = change - overall
  out = dict(overall=overall)
  sign = np.array([sign_test(diff[groups == g]) for g in range(num_groups)])
  # relative_g is a contrast of g against the rest: its sign-test fallback
  # compares the group's examples with the others' (only reached when no
  # example changed anywhere, so p = 1).
  for name, est, r, fb in (("change", change, reps, sign),
                           ("relative", relative, rel_reps, np.ones(num_groups))):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)
      se = np.nanstd(r, axis=0, ddof=1) if num_samples > 1 else np.zeros(num_groups)
    lo, hi = _ci(r, level)
    p = _wald_p(est, se, np.where(np.isnan(est), np.nan, np.where(est == 0, 1.0, fb)))
    out.update({name: est.tolist(), f"{name}_low": lo.tolist(), f"{name}_high": hi.tolist(),
                f"{name}_se": se.tolist(), f"{name}_p": p.tolist()})
  ose = float(np.std(overall_reps, ddof=1)) if num_samples > 1 else 0.0
  olo, ohi = _ci(overall_reps[:, None], level)
  out.update(overall_low=float(olo[0]), overall_high=float(ohi[0]), overall_se=ose,
             overall_p=float(_wald_p(np.array(overall), np.array(ose),
                                     np.array(sign_test(diff) if overall else 1.0))))
  return out


def across_seeds(values, alpha: float = 0.05) -> dict:
  """Tests per-seed differences (quantized minus float, one per seed) against 0.

  A paired t-test (the one-sample t-test of the differences, as
  `scipy.stats.ttest_rel` of the two per-seed series) and the exact Wilcoxon
  signed-rank test. Few seeds give these tests little or no power: the
  smallest two-sided Wilcoxon p-value with S non-zero differences is
  2 / 2^S (0.25 for 3 seeds), and the note says so.

  Returns:
    dict(num_seeds, mean, std, t_stat, t_p, wilcoxon_p, note).
  """
  v = np.asarray(values, np.float64)
  s = v.size
  out = dict(num_seeds=s, mean=float(v.mean()) if s else float("nan"),
             std=float(v.std(ddof=1)) if s > 1 else float("nan"),
             t_stat=float("nan"), t_p=float("nan"), wilcoxon_p=float("nan"), note="")
  if s < 2:
    out["note"] = f"{s} seed(s): no test across seeds."
    return out
  notes = []
  if np.all(v == v[0]):
    notes.append("all seeds give the same difference: the t-test is undefined")
  else:
    t = sps.ttest_1samp(v, 0.0)
    out.update(t_stat=float(t.statistic), t_p=float(t.pvalue))
  nonzero = int(np.sum(v != 0))
  out["wilcoxon_p"] = float(sps.wilcoxon(v, zero_method="wilcox").pvalue) if nonzero else 1.0
  floor = 2.0 / 2 ** max(nonzero, 1)  # the smallest p-value the signed ranks allow
  if floor > alpha:
    notes.append(f"with {nonzero} non-zero seed difference(s) the Wilcoxon p-value "
                 f"cannot fall below {floor:.3g} (> {alpha})")
  if s < 5:
    notes.append(f"{s} seeds: the t-test has {s - 1} degree(s) of freedom and little power")
  out["note"] = "; ".join(notes) + ("." if notes else "")
  return out
