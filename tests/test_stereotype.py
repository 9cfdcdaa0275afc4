"""baq.fairness.stereotype against hand-computed scores, scipy's binomial test,
and direct computation; bootstrap intervals cover and shrink."""

import collections

import numpy as np
import pytest
from scipy import stats as sps

from baq.fairness import stereotype


def test_crows_pairs_score_by_hand_with_ties_and_directions():
  ll_more = np.array([-1.0, -2.0, -3.0004, -1.5, -2.5, -0.5])
  ll_less = np.array([-2.0, -1.0, -3.0001, -1.0, -3.0, -0.7])
  direction = ["stereo", "stereo", "stereo", "antistereo", "antistereo", "stereo"]
  bias = ["gender", "gender", "age", "age", "gender", "age"]
  out = stereotype.crows_pairs_score(ll_more, ll_less, direction, bias, num_samples=200)
  o = out["overall"]
  # Pair 2 ties at 3 decimals: not preferred, but in the denominator.
  assert o["metric_score"] == pytest.approx(100 * 3 / 6)
  assert (o["num_pairs"], o["num_preferred"], o["num_ties"]) == (6, 3, 1)
  assert o["stereo_score"] == pytest.approx(100 * 2 / 3) and o["num_stereo"] == 3
  assert o["antistereo_score"] == pytest.approx(50.0) and o["num_antistereo"] == 2
  g, a = out["per_bias_type"]["gender"], out["per_bias_type"]["age"]
  assert out["bias_types"] == ["age", "gender"]
  assert g["metric_score"] == pytest.approx(200 / 3) and g["num_ties"] == 0
  assert (g["stereo_score"], g["antistereo_score"]) == (50.0, 100.0)
  assert a["metric_score"] == pytest.approx(100 / 3) and a["num_ties"] == 1
  assert (a["stereo_score"], a["antistereo_score"]) == (100.0, 0.0)
  for e in [o, g, a]:
    assert e["low"] <= e["metric_score"] <= e["high"]
  exact = stereotype.crows_pairs_score(ll_more, ll_less, direction, bias, decimals=None,
                                       num_samples=10)["overall"]
  assert exact["num_ties"] == 0 and exact["num_preferred"] == 3 and exact["num_stereo"] == 4
  with pytest.raises(ValueError, match="pair 1 has direction 'neutral'"):
    stereotype.crows_pairs_score(ll_more, ll_less, ["stereo", "neutral"] + direction[2:], bias)


def test_stereoset_scores_by_hand_per_target_then_averaged():
  ll = np.array([[-1, -2, -5],      # A: pro, 2 related
                 [-2, -1, -1.5],    # A: anti, 1 related
                 [-1, -1, -3],      # A: a tie counts as anti, 2 related
                 [-1, -2, -0.5],    # B: pro, 0 related
                 [-3, -1, -2],      # C: anti, 1 related
                 [-1, -3, -2]])     # C: pro, 1 related
  target = ["A", "A", "A", "B", "C", "C"]
  bias = ["gender"] * 4 + ["age"] * 2
  out = stereotype.stereoset_scores(ll, bias, target=target, num_samples=300)
  o = out["overall"]
  ss, lms = np.mean([100 / 3, 100, 50]), np.mean([500 / 6, 0, 50])
  assert (o["ss"], o["lms"]) == (pytest.approx(ss), pytest.approx(lms))
  assert o["icat"] == pytest.approx(lms * min(ss, 100 - ss) / 50)  # 34.57, from the means
  assert o["count"] == 6 and o["num_targets"] == 3
  g = out["per_bias_type"]["gender"]
  assert (g["ss"], g["lms"]) == (pytest.approx(200 / 3), pytest.approx(250 / 6))
  assert g["icat"] == pytest.approx(250 / 6 * (100 / 3) / 50)
  a = out["per_bias_type"]["age"]
  assert (a["ss"], a["lms"], a["icat"]) == (50.0, 50.0, 50.0)
  for e in [o, g, a]:
    for k in ("ss", "lms", "icat"):
      assert e[f"{k}_low"] <= e[k] <= e[f"{k}_high"], k
  pooled = stereotype.stereoset_scores(ll, bias, num_samples=0)["overall"]
  assert (pooled["ss"], pooled["lms"]) == (50.0, pytest.approx(700 / 12))
  assert "ss_low" not in pooled


def test_stereoset_matches_a_direct_per_target_count_on_random_scores():
  rng = np.random.default_rng(0)
  ll = rng.normal(size=(500, 3))
  target = rng.choice([f"t{i}" for i in range(17)], 500)
  counts = collections.defaultdict(collections.Counter)
  for (s, a, u), t in zip(ll, target):
    counts[t]["pro" if s > a else "anti"] += 1
    counts[t]["related"] += int(s > u) + int(a > u)
    counts[t]["total"] += 1
  ss = np.mean([100 * c["pro"] / c["total"] for c in counts.values()])
  lms = np.mean([100 * c["related"] / (2 * c["total"]) for c in counts.values()])
  o = stereotype.stereoset_scores(ll, ["x"] * 500, target=target, num_samples=0)["overall"]
  assert (o["ss"], o["lms"]) == (pytest.approx(ss), pytest.approx(lms))


def test_icat_formula_cases():
  assert stereotype.icat(80.0, 50.0) == 80.0  # SS = 50: ICAT = LMS
  assert stereotype.icat(80.0, 100.0) == 0.0 and stereotype.icat(80.0, 0.0) == 0.0
  assert stereotype.icat(80.0, 75.0) == pytest.approx(40.0)
  assert stereotype.icat(80.0, 25.0) == pytest.approx(40.0)
  fair = stereotype.stereoset_scores([[-1, -2, -9], [-2, -1, -9]], ["g"] * 2,
                                     num_samples=0)["overall"]
  assert (fair["ss"], fair["lms"], fair["icat"]) == (50.0, 100.0, 100.0)
  biased = stereotype.stereoset_scores([[-1, -2, -9], [-1, -3, -9]], ["g"] * 2,
                                       num_samples=0)["overall"]
  assert (biased["ss"], biased["lms"], biased["icat"]) == (100.0, 100.0, 0.0)


def test_paired_change_mcnemar_against_binomtest_and_holm():
  rng = np.random.default_rng(1)
  n = 400
  bias = np.array(["age", "gender"])[rng.integers(0, 2, n)]
  pref_float = (rng.random(n) < 0.6).astype(int)
  flip = rng.random(n) < np.where(bias == "gender", 0.25, 0.05)
  pref_quant = np.where(flip, rng.integers(0, 2, n), pref_float)
  out = stereotype.paired_stereotype_change(pref_quant, pref_float, bias, num_samples=500)
  ps = []
  for name in ("age", "gender"):
    sel = bias == name
    e = out["per_bias_type"][name]
    b = int(np.sum((pref_float == 1) & (pref_quant == 0) & sel))
    c = int(np.sum((pref_float == 0) & (pref_quant == 1) & sel))
    assert (e["b"], e["c"]) == (b, c)
    assert e["p_value"] == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue)
    assert e["change"] == pytest.approx(100 * (c - b) / sel.sum())
    assert e["score_quant"] - e["score_float"] == pytest.approx(e["change"])
    assert e["change_low"] <= e["change"] <= e["change_high"]
    ps.append(e["p_value"])
  lo, hi = sorted(ps)
  holm = {lo: min(1.0, 2 * lo), hi: min(1.0, max(2 * lo, hi))}
  for name, p in zip(("age", "gender"), ps):
    assert out["per_bias_type"][name]["p_adjusted"] == pytest.approx(holm[p])
  o = out["overall"]
  b, c = int(np.sum(pref_float > pref_quant)), int(np.sum(pref_float < pref_quant))
  assert (o["b"], o["c"]) == (b, c)
  assert o["p_value"] == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue)
  assert o["change"] == pytest.approx(100 * (c - b) / n)
  none = stereotype.paired_stereotype_change(pref_quant, pref_float, bias, num_samples=50,
                                             correction="none")
  assert none["per_bias_type"]["age"]["p_adjusted"] == ps[0]


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_n():
  rng = np.random.default_rng(2)
  widths = []
  for n in (100, 4000):
    ll_more, ll_less = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
    o = stereotype.crows_pairs_score(ll_more, ll_less, ["stereo"] * n, ["gender"] * n,
                                     num_samples=1000)["overall"]
    assert o["low"] <= o["metric_score"] <= o["high"]
    widths.append(o["high"] - o["low"])
  assert widths[1] < widths[0] / 4  # sqrt(40) ~ 6.3 in theory
  ss_widths = []
  for n in (100, 4000):
    o = stereotype.stereoset_scores(rng.normal(size=(n, 3)), ["g"] * n, num_samples=500)["overall"]
    assert o["ss_low"] <= o["ss"] <= o["ss_high"]
    ss_widths.append(o["ss_high"] - o["ss_low"])
  assert ss_widths[1] < ss_widths[0] / 4
  again = stereotype.crows_pairs_score(ll_more, ll_less, ["stereo"] * n, ["gender"] * n,
                                       num_samples=1000)["overall"]
  assert again["high"] - again["low"] == widths[1]  # seeded


def test_perplexity_against_direct_computation():
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, 12, 60)
  mask = np.arange(12)[None, :] < lengths[:, None]
  nll = rng.exponential(2.0, (60, 12))
  nll[~mask] = np.nan  # padding may hold anything
  out = stereotype.perplexity(nll, mask, num_samples=1000)
  direct = np.exp(np.nansum(nll) / lengths.sum())
  assert out["perplexity"] == pytest.approx(direct)
  assert out["mean_nll"] == pytest.approx(np.log(direct))
  assert (out["num_tokens"], out["num_sentences"]) == (lengths.sum(), 60)
  assert out["low"] < out["perplexity"] < out["high"]
  big = stereotype.perplexity(np.tile(nll, (20, 1)), np.tile(mask, (20, 1)), num_samples=500)
  assert big["perplexity"] == pytest.approx(direct)
  assert big["high"] - big["low"] < (out["high"] - out["low"]) / 3
  with pytest.raises(ValueError, match="no tokens"):
    stereotype.perplexity(nll, np.zeros_like(mask))
