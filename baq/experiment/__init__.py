"""The drivers above the training library: the main job and what runs it many times.

  job                the main job: float, baselines, methods, report
                     (train.py, eval.py)
  checks             a config refused before any work; a workdir's config
  lanes              independent runs side by side (config.concurrent_runs)
  deploy             a run at integer bits: evaluated and exported
  runtime_baselines  the runtimes' numerics (llm_int8, nf4, ...) as baselines
  diagnostics        the per-group analysis (eval.py --diagnostics)
  sweep              the main job over seeds (python -m baq.experiment.sweep)
  pareto             accuracy against bits over seeds and budgets
                     (python -m baq.experiment.pareto)
  exhaustive         every allocation of a small model, scored
                     (python -m baq.experiment.exhaustive)
"""
