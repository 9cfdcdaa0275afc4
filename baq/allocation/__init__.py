"""The static allocation path (FairQuant stages 1-2): curvature, importance, solver.

  curvature   Hessian-vector products and Hutchinson / forward-over-forward
              traces and diagonals per group (pure functions of a group loss)
  importance  per-unit, per-group, per-bit-width sensitivity measures and the
              reducers that combine groups
  solver      the exact budgeted choice of integer bits (dynamic programming,
              Lagrangian fixing + ILP) and FairQuant's quantile baseline
  eigen       the top Hessian eigenvalue per group (power iteration)
  planner     calibration statistics -> tables -> an allocation (no file I/O)
"""
