"""Training: modes, the train state and step, the loop, and the main job.

  modes        how a mode name turns into a quantizer and trainable leaves
  state        create_train_state: model, optimizer, penalties, step-0 state
  step         make_train_step: the jittable update
  trainer      the loop: shardings, restore, steps, logging, checkpoints
  progress     metrics.jsonl, progress lines, the finite-loss check
  validate     refusing a config that cannot run; a workdir's config
  deploy       a run at integer bits: evaluated and exported
  checkpoint   orbax checkpoints of the whole train state
  sharding     the (data, model) mesh, sharding rules, multi-host start-up
  evaluate     predictions and metrics of a model on a split
  workdir      the one owner of run names, file names and checkpoints
  experiment   the main job (train.py / eval.py)
  diagnostics  the "disparately skews" per-group analysis (eval.py --diagnostics)
  sweep        the main job over seeds, mean and spread (python -m baq.experiment.sweep)
  pareto       accuracy against bits over seeds and budgets (python -m baq.experiment.pareto)
"""
