"""The bias study: quantizers x bits x seeds, per-group tests and verdicts.

  python -m baq.study.bias --config=configs/bias_study.py --workdir=/tmp/baq_study

  __main__     the command line (--config, --workdir)
  runner       the grid of cells, resumable, and study.json
  cells        how one cell (float, PTQ, GPTQ, Fair-GPTQ, QAT, BAQ, numerics) is computed
  resume       which config a study root can resume with
  pairs        Fair-GPTQ's paired calibration examples
  report       the per-group comparison of every cell with its float model
  plots        accuracy against bits, the Pareto plot

The statistics are baq.stats (significance, corrections).
"""
