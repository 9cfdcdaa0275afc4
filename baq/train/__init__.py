"""Training: modes, the train state and step, the loop, and the main job.

  modes        how a mode name turns into a quantizer and trainable leaves
  trainer      train state, jitted step and the loop that runs them
  checkpoint   orbax checkpoints of the whole train state
  sharding     the (data, model) mesh, sharding rules, multi-host start-up
  evaluate     predictions and metrics of a model on a split
  workdir      the one owner of run names, file names and checkpoints
  experiment   the main job (train.py / eval.py)
  diagnostics  the "disparately skews" per-group analysis (eval.py --diagnostics)
"""
