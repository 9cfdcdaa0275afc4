"""The bias study: quantizers x bits x seeds, per-group tests and verdicts.

  python -m baq.study --config=configs/bias_study.py --root=/tmp/baq_study

  runner  the grid of cells, resumable, and study.json
  cells   how one cell (PTQ, GPTQ, Fair-GPTQ, QAT, BAQ) is computed
  pairs   Fair-GPTQ's paired calibration examples
  stats   bootstrap, McNemar, multiple-testing corrections, verdicts
  report  the per-group comparison of every cell with its float model
"""
