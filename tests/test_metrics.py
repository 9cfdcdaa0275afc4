"""Fairness metrics against hand-computed values, and the table."""

import numpy as np
import pytest

from baq.fairness import metrics as M


def test_metrics_by_hand():
  # group 0: 4 examples, group 1: 4 examples; positive class 1.
  labels = np.array([1, 1, 0, 0, 1, 1, 0, 2])
  preds = np.array([1, 0, 0, 1, 1, 1, 1, 2])
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  m = M.classification_metrics(preds, labels, groups, 3, positive_class=1)
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
  m = M.classification_metrics(np.array([0, 1]), np.array([0, 0]), np.array([0, 1]), 2)
  m.update(avg_bits=4.0, size_bytes=2048.0)
  table = M.format_table({"fp32": m, "baq": m}, ["I", "II"])
  lines = table.splitlines()
  assert len(lines) == 4 and lines[2].startswith("fp32") and "100.00" in lines[2]
  assert "4.00" in lines[3] and "2.0" in lines[3]
