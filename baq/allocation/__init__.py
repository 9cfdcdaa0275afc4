"""The static allocation path (FairQuant stages 1-2): curvature, importance, solver.

  curvature   Hessian-vector products and Hutchinson / forward-over-forward
              traces and diagonals per group (pure functions of a group loss)
  importance  per-unit, per-group, per-bit-width sensitivity measures and the
              reducers that combine groups
  solver      the exact budgeted choice of integer bits (dynamic programming,
              Lagrangian fixing + ILP) and FairQuant's quantile baseline
  minimax     the exact choice that minimises the worst group's summed
              sensitivity (groups unreduced; HiGHS ILP, ties to the best mean)
  eigen       the top Hessian eigenvalue per group (power iteration)
  statistics  a group-balanced calibration sample and the per-group kernel
              statistics (gradients, curvature, measured loss changes) on it
  planner     calibration statistics -> tables -> an allocation (no file I/O)
  projection  searched continuous bits -> integer bits under the budget
              (nearest, or measured by the model's loss)
  landscape   every budget-filling integer allocation of a few units
"""
