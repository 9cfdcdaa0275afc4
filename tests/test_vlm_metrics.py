"""baq.fairness.vlm_metrics: zero-shot predictions, FACET disparity, retrieval skew
(MaxSkew@k, MinSkew@k, NDKL) against hand computations and a brute-force
transcription of the definitions, the paired t-test against scipy, verdicts."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from baq.fairness import vlm_metrics as vm

# Gallery of six images: groups 0,0,0,1,1,2 (shares 1/2, 1/3, 1/6). The query
# ranks images 3, 0, 4, 1, 2, 5, so its top 3 has groups 1, 0, 1.
GROUPS = np.array([0, 0, 0, 1, 1, 2])
SIM = np.array([[5.0, 3.0, 2.0, 6.0, 4.0, 1.0]])


def brute_force(sim, groups, k, desired, smoothing):
  """The definitions, one query and one rank at a time, in plain Python."""
  g, n = int(max(groups)) + 1, len(groups)
  pop = [sum(1 for x in groups if x == j) for j in range(g)]
  want = ([p / n for p in pop] if desired == "gallery" else [1 / g] * g)
  out = []
  for row in sim:
    order = sorted(range(n), key=lambda i: (-row[i], i))[:k]
    counts = [sum(1 for i in order if groups[i] == j) for j in range(g)]
    if smoothing == "count_one":  # Berg et al.: an absent group counts once
      shares = [max(c, 1) / k for c in counts]
    else:
      shares = [(c + smoothing) / (k + smoothing * g) for c in counts]
    skew = [math.log(s / w) for s, w in zip(shares, want)]
    ndkl, z = 0.0, 0.0
    for i in range(1, k + 1):
      p = [sum(1 for r in order[:i] if groups[r] == j) / i for j in range(g)]
      kl = sum(pj * math.log(pj / wj) for pj, wj in zip(p, want) if pj > 0)
      ndkl += kl / math.log2(i + 1)
      z += 1 / math.log2(i + 1)
    out.append((max(skew), min(skew), ndkl / z))
  return np.array(out)


def test_skew_and_ndkl_by_hand():
  r = vm.retrieval_skew(SIM, GROUPS, 3)
  # Top-3 shares 1/3, 2/3 and 0 -> 1/3 (counted once) against 1/2, 1/3, 1/6.
  np.testing.assert_allclose(r["skew"][0], [math.log(2 / 3), math.log(2), math.log(2)])
  assert r["max_skew"] == pytest.approx(math.log(2))
  assert r["min_skew"] == pytest.approx(math.log(2 / 3))
  kl = [math.log(3), 0.5 * math.log(1.5), math.log(2 / 3) / 3 + 2 * math.log(2) / 3]
  w = [1, 1 / math.log2(3), 0.5]
  assert r["ndkl"] == pytest.approx(sum(a * b for a, b in zip(kl, w)) / sum(w))
  assert r["desired"] == pytest.approx([1 / 2, 1 / 3, 1 / 6])
  uniform = vm.retrieval_skew(SIM, GROUPS, 3, desired="uniform")
  np.testing.assert_allclose(uniform["skew"][0], [0, math.log(2), 0], atol=1e-12)
  additive = vm.retrieval_skew(SIM, GROUPS, 3, smoothing=0.5)  # via metrics.skew_at_k
  np.testing.assert_allclose(additive["skew"][0],
                             [math.log(2 / 3), math.log(5 / 3), math.log(2 / 3)])
  assert additive["ndkl"] == r["ndkl"]  # NDKL needs no smoothing
  explicit = vm.retrieval_skew(SIM, GROUPS, 3, desired=[1 / 2, 1 / 3, 1 / 6])
  assert explicit["skew"] == r["skew"]


@pytest.mark.parametrize("desired", ["gallery", "uniform"])
@pytest.mark.parametrize("smoothing", ["count_one", 0.5])
def test_skew_and_ndkl_match_brute_force(desired, smoothing, monkeypatch):
  monkeypatch.setattr(vm, "_CHUNK_ELEMENTS", 100)  # NDKL in chunks of 1-6 queries
  rng = np.random.default_rng(3)
  groups = rng.integers(0, 3, 40)
  sim = rng.normal(size=(7, 40))
  for k in (1, 5, 17, 40):
    r = vm.retrieval_skew(sim, groups, k, desired=desired, smoothing=smoothing)
    ref = brute_force(sim, groups.tolist(), k, desired, smoothing)
    np.testing.assert_allclose(r["max_skew_per_query"], ref[:, 0], rtol=1e-12)
    np.testing.assert_allclose(r["min_skew_per_query"], ref[:, 1], rtol=1e-12)
    np.testing.assert_allclose(r["ndkl_per_query"], ref[:, 2], rtol=1e-10, atol=1e-15)
    assert r["max_skew"] == pytest.approx(ref[:, 0].mean())
    assert r["ndkl"] == pytest.approx(ref[:, 2].mean())
  # Over the whole gallery the top-k shares are the gallery's: no skew.
  full = vm.retrieval_skew(sim, groups, 40)
  np.testing.assert_allclose(full["max_skew_per_query"], 0, atol=1e-12)


def test_ties_keep_gallery_order_and_absent_groups_are_left_out():
  r = vm.retrieval_skew(np.zeros(6), GROUPS, 2)  # top 2 = images 0, 1
  assert r["skew"][0][0] == pytest.approx(math.log(2))
  r = vm.retrieval_skew(SIM, GROUPS, 3, num_groups=5)  # groups 3, 4: no images
  assert r["skew"][0][3:] == [None, None]
  assert r["max_skew"] == pytest.approx(math.log(2))
  assert r["max_group_per_query"] == [1] and r["min_group_per_query"] == [0]


def test_retrieval_errors():
  with pytest.raises(ValueError, match=r"k=7 is larger than the gallery \(6 images\)"):
    vm.retrieval_skew(SIM, GROUPS, 7)
  with pytest.raises(ValueError, match="'race' has a single group"):
    vm.retrieval_skew(SIM, np.zeros(6, int), 3, attribute="race")
  with pytest.raises(ValueError, match="positive on the gallery's groups"):
    vm.retrieval_skew(SIM, GROUPS, 3, desired=[0.5, 0.5, 0.0])
  with pytest.raises(ValueError, match="Valid: gallery, uniform"):
    vm.retrieval_skew(SIM, GROUPS, 3, desired="equal")
  with pytest.raises(ValueError, match="6 images"):
    vm.retrieval_skew(SIM, GROUPS[:5], 3)
  with pytest.raises(ValueError, match=r"'age': group ids must lie in \[0, 2\)"):
    vm.retrieval_skew(SIM, GROUPS, 3, num_groups=2, attribute="age")


def test_zero_shot_predictions_match_direct_cosine_argmax():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(30, 8)) * rng.uniform(0.1, 10, (30, 1))  # unnormalised
  texts = rng.normal(size=(4, 8)) * rng.uniform(0.1, 10, (4, 1))
  direct = [int(np.argmax([a @ t / (np.linalg.norm(a) * np.linalg.norm(t)) for t in texts]))
            for a in images]
  np.testing.assert_array_equal(vm.zero_shot_predictions(images, texts), direct)
  assert len(set(direct)) > 1  # the norms alone would not pick these classes
  np.testing.assert_allclose(vm.cosine_similarity(images, texts)[3, 2],
                             images[3] @ texts[2] / np.linalg.norm(images[3])
                             / np.linalg.norm(texts[2]))


def test_disparity_on_a_hand_example():
  # Group 0: recall 1/2 (class 0) and 1 (class 1), accuracy 3/4. Group 1:
  # recall 2/3 and 1/2, accuracy 3/5. Group 2: one class-0 image, right.
  label = [0, 0, 1, 1, 0, 0, 0, 1, 1, 0]
  pred = [0, 1, 1, 1, 0, 0, 1, 0, 1, 0]
  groups = [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]
  d = vm.group_accuracy_disparity(pred, label, groups, 3, attribute="gender")
  assert d["group_accuracy"] == pytest.approx([3 / 4, 3 / 5, 1])
  assert d["accuracy_gap"] == pytest.approx(1 - 3 / 5)
  assert d["worst_group"] == 1
  assert d["class_recall"][0] == pytest.approx([1 / 2, 1])
  assert d["class_recall"][2] == [1.0, None]
  assert d["class_count"] == [[2, 2], [3, 2], [1, 0]]
  assert d["disparity"][0][1] == pytest.approx([1 / 2 - 2 / 3, 1 - 1 / 2])  # FACET: a - b
  assert d["disparity"][1][0] == pytest.approx([2 / 3 - 1 / 2, -1 / 2])
  assert d["disparity"][2][0] == [pytest.approx(1 / 2), None]
  assert d["class_recall_gap"] == pytest.approx([1 - 1 / 2, 1 - 1 / 2])
  assert d["max_class_recall_gap"] == pytest.approx(1 / 2)
  assert d["mean_class_recall_gap"] == pytest.approx(1 / 2)
  two = vm.group_accuracy_disparity(pred[:9], label[:9], groups[:9], 2)
  assert two["class_recall_gap"] == pytest.approx([1 / 6, 1 / 2])
  assert two["max_gap_class"] == 1 and two["accuracy_gap"] == pytest.approx(0.15)


def test_disparity_refuses_a_single_group():
  with pytest.raises(ValueError, match="attribute 'skin_tone' has a single group"):
    vm.group_accuracy_disparity([0, 1], [0, 1], [2, 2], 3, attribute="skin_tone")
  with pytest.raises(ValueError, match=r"'age': group ids must lie in \[0, 2\)"):
    vm.group_accuracy_disparity([0, 1], [0, 1], [0, 2], 2, attribute="age")


def test_paired_t_matches_scipy_and_degenerate_cases():
  rng = np.random.default_rng(1)
  f = rng.normal(size=25)
  q = f + rng.normal(0.3, 1, 25)
  r = vm.paired_t(q, f)
  ref = sps.ttest_rel(q, f)
  assert r["t"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
  assert r["mean_change"] == pytest.approx(np.mean(q - f)) and r["df"] == 24
  correct_f, correct_q = [1, 1, 0, 1, 0, 1], [1, 0, 0, 0, 0, 1]  # per-image correctness
  assert vm.paired_t(correct_q, correct_f)["p"] == pytest.approx(
      sps.ttest_rel(correct_q, correct_f).pvalue)
  same = vm.paired_t(f, f)  # scipy gives NaN here
  assert (same["t"], same["p"], same["mean_change"]) == (0.0, 1.0, 0.0)
  shifted = vm.paired_t(np.arange(5.0) + 1, np.arange(5.0))  # exactly constant
  assert shifted["t"] == math.inf and shifted["p"] == 0.0
  with pytest.raises(ValueError, match="same length"):
    vm.paired_t([1, 2, 3], [1, 2])


def test_verdicts():
  assert vm.verdict(0.2, 0.01, direction="max_skew") == "amplified"
  assert vm.verdict(-0.2, 0.01, direction="max_skew") == "reduced"
  assert vm.verdict(-0.2, 0.01, direction="min_skew") == "amplified"  # more negative
  assert vm.verdict(0.05, 0.001, direction="gap") == "amplified"  # a larger gap
  assert vm.verdict(-0.05, 0.001, direction="accuracy") == "amplified"
  assert vm.verdict(0.2, 0.05) == "no change"  # p must be below alpha
  assert vm.verdict(0.2, float("nan")) == "no change"
  assert vm.verdict(0.0, 0.0) == "no change"
  assert vm.verdict([0.1, -0.1, 0.1, 0.1], [0.01, 0.01, 0.2, 0.04], alpha=0.05,
                    direction="ndkl") == ["amplified", "reduced", "no change", "amplified"]
  with pytest.raises(ValueError, match="Valid: up, down, max_skew"):
    vm.verdict(0.1, 0.01, direction="sideways")
