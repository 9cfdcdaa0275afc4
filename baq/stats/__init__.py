"""Statistics shared by the fairness metrics and the studies.

  significance  bootstrap intervals, paired change tests, McNemar, across seeds
  corrections   multiple-testing corrections (Holm, Benjamini-Hochberg) and verdicts
"""
