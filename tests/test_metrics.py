"""Fairness metrics against hand-computed values, and the table."""

import numpy as np
import pytest

from baq.fairness import metrics


def test_metrics_by_hand():
  # group 0: 4 examples, group 1: 4 examples; positive class 1.
  labels = np.array([1, 1, 0, 0, 1, 1, 0, 2])
  preds = np.array([1, 0, 0, 1, 1, 1, 1, 2])
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  m = metrics.classification_metrics(preds, labels, groups, 3, positive_class=1)
  assert m["accuracy"] == pytest.approx(5 / 8)
  assert m["group_accuracy"][:2] == [pytest.approx(0.5), pytest.approx(0.75)]
  assert m["group_accuracy"][2] is None  # empty group
  assert m["worst_group"] == 0 and m["worst_group_accuracy"] == pytest.approx(0.5)
  assert m["accuracy_gap"] == pytest.approx(0.25)
  # P(pred=1): g0 2/4, g1 3/4.
  assert m["demographic_parity_gap"] == pytest.approx(0.25)
  # TPR: g0 1/2, g1 2/2. FPR: g0 1/2, g1 1/2.
  assert m["equal_opportunity_gap"] == pytest.approx(0.5)
  assert m["equalized_odds_gap"] == pytest.approx(0.5)


def test_table_lists_every_method_and_group():
  m = metrics.classification_metrics(np.array([0, 1]), np.array([0, 0]), np.array([0, 1]), 2)
  m.update(avg_bits=4.0, size_bytes=2048.0)
  table = metrics.format_table({"fp32": m, "baq": m}, ["I", "II"])
  lines = table.splitlines()
  assert len(lines) == 4 and lines[2].startswith("fp32") and "100.00" in lines[2]
  assert "4.00" in lines[3] and "2.0" in lines[3]


def test_skew_at_k_by_hand():
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
  groups = np.array([0, 0, 1, 0, 1, 1])   # population shares 1/2, 1/2; group 2 absent
  out = metrics.skew_at_k(scores, groups, 3, k=3, smoothing=0.0)
  np.testing.assert_allclose(out["skew"][:2], [np.log(4 / 3), np.log(2 / 3)])
  assert np.isnan(out["skew"][2])
  assert out["max_skew"] == pytest.approx(np.log(4 / 3)) and out["max_group"] == 0
  assert out["min_skew"] == pytest.approx(np.log(2 / 3)) and out["min_group"] == 1
  # Top 2 are both group 0: plain formula gives -inf; smoothing 0.5 gives
  # shares (2.5/3, 0.5/3) -> skews log(5/3), log(1/3).
  assert metrics.skew_at_k(scores, groups, 3, k=2, smoothing=0.0)["min_skew"] == -np.inf
  sm = metrics.skew_at_k(scores, groups, 3, k=2)
  np.testing.assert_allclose(sm["skew"][:2], [np.log(5 / 3), np.log(1 / 3)])
  assert metrics.skew_at_k(scores, groups, 3, k=6, smoothing=0.0)["max_skew"] == pytest.approx(0.0)
