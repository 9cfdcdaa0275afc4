"""baq.stats.significance and baq.stats.corrections against hand-computed values, scipy,
and coverage on simulated data."""

import numpy as np
import pytest
from scipy import stats as sps

from baq.stats import corrections, significance as stats


def test_group_accuracy_by_hand_with_seeds_averaged_per_example():
  groups = np.array([0, 0, 0, 0, 1, 1, 1])
  correct = np.array([[1, 1, 0, 1, 0, 0, 1],
                      [1, 0, 0, 1, 0, 0, 1]])
  out = stats.group_accuracy_ci(correct, groups, 3, num_samples=500)
  assert out["accuracy"][:2] == pytest.approx([2.5 / 4, 1 / 3])
  assert np.isnan(out["accuracy"][2]) and np.isnan(out["low"][2]) and out["count"] == [4, 3, 0]
  assert out["overall"] == pytest.approx(np.mean([2.5 / 4] * 4 + [1 / 3] * 3))
  for g in range(2):
    assert out["low"][g] <= out["accuracy"][g] <= out["high"][g]
  # Group 1's examples are all-or-nothing across seeds; all-ones gives [1, 1].
  ones = stats.group_accuracy_ci(np.ones(5), np.zeros(5, int), 1)
  assert ones["low"] == [1.0] and ones["high"] == [1.0]


def test_multinomial_bootstrap_matches_resampling_moments():
  v = np.random.default_rng(0).integers(0, 2, 300).astype(float)
  reps = stats.bootstrap_group_means(v, np.zeros(300, int), 1, num_samples=20000, seed=1)[:, 0]
  assert reps.mean() == pytest.approx(v.mean(), abs=2e-3)
  assert reps.std() == pytest.approx(np.sqrt(v.mean() * (1 - v.mean()) / 300), rel=0.03)


def test_bootstrap_interval_coverage_is_nominal():
  rng = np.random.default_rng(0)
  groups = np.repeat([0, 1], [150, 100])
  p = np.array([0.3, 0.8])
  hits, hits_all, trials = np.zeros(2), 0, 400
  truth_all = (150 * 0.3 + 100 * 0.8) / 250
  for t in range(trials):
    correct = (rng.random(250) < p[groups]).astype(float)
    out = stats.group_accuracy_ci(correct, groups, 2, num_samples=1000, seed=t)
    hits += (np.array(out["low"]) <= p) & (p <= np.array(out["high"]))
    hits_all += out["overall_low"] <= truth_all <= out["overall_high"]
  # Measured 0.960 / 0.953 (groups), 0.953 (overall); 400 trials, sd ~0.011.
  assert np.all(np.abs(hits / trials - 0.95) < 0.035), hits / trials
  assert abs(hits_all / trials - 0.95) < 0.035


def test_mcnemar_exact_is_the_binomial_test_of_discordant_pairs():
  # b = 3 float-right/quant-wrong, c = 12 the reverse, 20 concordant.
  f = np.array([1] * 3 + [0] * 12 + [1] * 10 + [0] * 10)
  q = np.array([0] * 3 + [1] * 12 + [1] * 10 + [0] * 10)
  out = stats.mcnemar_exact(f, q)
  assert (out["b"], out["c"]) == (3, 12)
  assert out["p_value"] == pytest.approx(sps.binomtest(3, 15, 0.5).pvalue)
  assert stats.mcnemar_exact([1] * 5, [0] * 5)["p_value"] == pytest.approx(2 / 32)  # 2 * 0.5^5
  assert stats.mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0


def test_paired_change_by_hand():
  groups = np.array([0, 0, 0, 0, 1, 1])
  f = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1]])
  q = np.array([[1, 1, 0, 1, 0, 0], [1, 0, 1, 0, 0, 1]])
  out = stats.paired_change(q, f, groups, 2, num_samples=2000)
  # Per-example seed-mean diffs: [0, -.5, -.5, 0, -1, 0].
  assert out["change"] == pytest.approx([-0.25, -0.5])
  assert out["overall"] == pytest.approx(-2 / 6)
  assert out["relative"] == pytest.approx([-0.25 + 2 / 6, -0.5 + 2 / 6])
  assert out["change_low"][1] <= -0.5 <= out["change_high"][1]
  # relative_g = (1 - w_g) (change_g - change_rest): the same on every replicate.
  assert out["relative_se"][0] == pytest.approx(out["relative_se"][1] / 2, rel=1e-9)
  # A group whose every example changed the same way has a zero bootstrap SE:
  # the exact sign test takes over (4 of 4 dropped: p = 2 / 16).
  ex = stats.paired_change(np.zeros(4), np.ones(4), np.zeros(4, int), 1)
  assert ex["change"] == [-1.0] and ex["change_p"] == pytest.approx([0.125])


def test_paired_change_coverage_and_type_one_error():
  rng = np.random.default_rng(1)
  n, trials = 400, 300

  def simulate(drop, gain):
    f = rng.random(n) < 0.8
    flip = np.where(f, rng.random(n) < drop, rng.random(n) < gain)
    return np.where(flip, ~f, f).astype(float), f.astype(float)

  truth = -0.8 * 0.10 + 0.2 * 0.20   # change of the first scenario: -0.04
  cover = reject_h0 = 0
  for t in range(trials):
    q, f = simulate(0.10, 0.20)
    out = stats.paired_change(q, f, np.zeros(n, int), 1, num_samples=1000, seed=t)
    cover += out["change_low"][0] <= truth <= out["change_high"][0]
    q0, f0 = simulate(0.05, 0.20)    # equal accuracy: 0.8 * 0.05 = 0.2 * 0.2
    reject_h0 += stats.paired_change(q0, f0, np.zeros(n, int), 1, num_samples=1000,
                                 seed=t)["change_p"][0] < 0.05
  assert abs(cover / trials - 0.95) < 0.04, cover / trials   # measured 0.940
  assert 0.015 < reject_h0 / trials < 0.09, reject_h0 / trials  # measured 0.053


def test_across_seeds_t_test_wilcoxon_and_notes():
  d = np.array([-0.01, -0.03, -0.02])
  out = stats.across_seeds(d)
  assert out["t_p"] == pytest.approx(sps.ttest_rel(d + 0.5, np.full(3, 0.5)).pvalue)
  assert out["wilcoxon_p"] == pytest.approx(0.25)   # 2 / 2^3: the smallest possible
  assert "cannot fall below 0.25" in out["note"]
  one = stats.across_seeds([0.1])
  assert "1 seed" in one["note"] and np.isnan(one["t_p"])
  flat = stats.across_seeds([0.0, 0.0])
  assert flat["wilcoxon_p"] == 1.0 and "undefined" in flat["note"]
  many = stats.across_seeds(-0.02 + 0.01 * np.random.default_rng(0).normal(size=8))
  assert many["note"] == "" and many["wilcoxon_p"] < 0.05


def test_holm_and_benjamini_hochberg_by_hand():
  p = np.array([0.01, 0.04, 0.03, 0.005])
  # Holm: sorted .005 .01 .03 .04 times 4 3 2 1 = .02 .03 .06 .04, running max.
  np.testing.assert_allclose(corrections.holm(p), [0.03, 0.06, 0.06, 0.02])
  # BH: sorted times 4/i = .02 .02 .04 .04, running min from the top.
  np.testing.assert_allclose(corrections.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
  q = np.random.default_rng(0).random(30) ** 3
  np.testing.assert_allclose(corrections.benjamini_hochberg(q), sps.false_discovery_control(q))
  with_nan = corrections.adjust([0.01, np.nan, 0.02], "holm")
  np.testing.assert_allclose(with_nan, [0.02, np.nan, 0.02])
  assert corrections.holm([0.6, 0.9]).max() == 1.0
  with pytest.raises(ValueError, match="Valid: holm, bh, none"):
    corrections.adjust(p, "bonf")


def test_verdict_rules_by_hand():
  change = [-0.10, -0.10, -0.01, 0.05, 0.02, -0.2]
  change_p = [0.001, 0.001, 0.5, 0.001, 0.01, np.nan]
  relative = [-0.05, -0.05, 0.03, 0.04, -0.03, -0.1]
  relative_p = [0.01, 0.2, 0.001, 0.001, 0.01, np.nan]
  assert corrections.verdicts(change, change_p, relative, relative_p) == [
      "amplified", "no significant change", "reduced", "reduced", "amplified",
      "no significant change"]
  # strict: the group's own change must be significant with the same sign.
  assert corrections.verdicts(change, change_p, relative, relative_p, rule="strict") == [
      "amplified", "no significant change", "no significant change", "reduced",
      "no significant change", "no significant change"]
  got = corrections.verdicts(change, change_p, relative, relative_p)
  assert set(got) <= set(corrections.VERDICTS)
