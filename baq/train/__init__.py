"""The training library: modes, the train state and step, the loop, checkpoints.

  modes        how a mode name turns into a quantizer and trainable leaves
  state        create_train_state: model, optimizer, penalties, step-0 state
  step         make_train_step: the jittable update
  loop         train: shardings, restore, steps, logging, checkpoints
  fit          the studies' small trainer (the in-run LM and CLIP)
  progress     metrics.jsonl, progress lines, the finite-loss check
  checkpoint   orbax checkpoints of the whole train state
  sharding     the (data, model) mesh, sharding rules, multi-host input
  evaluate     predictions and metrics of a model on a split
  rounding     how a bit search's bits become integers

The drivers that use it (the main job, sweeps, studies) are in
baq.experiment and baq.study.
"""
