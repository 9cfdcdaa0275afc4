"""The bias study: quantizers x bits x seeds, per-group tests and verdicts.

  python -m baq.study.bias --config=configs/bias_study.py --workdir=/tmp/baq_study

  __main__     the command line (flags --config, --workdir)
  runner       the grid of cells, resumable, and study.json
  cells        how one cell (float, PTQ, GPTQ, Fair-GPTQ, QAT, BAQ) is computed
  pairs        Fair-GPTQ's paired calibration examples
  stats        bootstrap intervals, paired change tests, McNemar, across seeds
  corrections  multiple-testing corrections and the verdicts
  report       the per-group comparison of every cell with its float model
"""
