r"""Tiny: the default experiment shrunk to seconds, for tests and smoke runs.

  python train.py --config=configs/tiny.py --workdir=/tmp/baq_tiny

Same pipeline as configs/default.py (float, uniform 8/4, BAQ, report) on a
16x16 SYNTHETIC set of a few hundred images with a two-block CNN.
"""

from configs import default


def get_config(arg=None):
  """Returns the tiny config (`arg` is passed to the default config)."""
  # The tests' settings, whatever the main job's defaults become: the earlier
  # defaults (a 4-bit budget against uniform 8/4, abs-max scales, the numpy
  # references of the export tests, BAQ's own schedule within `steps`).
  c = default.get_config(",".join(filter(None, ("absmax4", arg))))
  c.dataset.kwargs.update(dict(image_size=16, num_train=256, num_validation=64, num_test=128))
  c.model.kwargs.update(dict(widths=(4, 8), hidden=8))
  c.batch_size = 32
  c.eval_batch_size = 64
  c.float_steps, c.steps = 12, 8
  c.log_every = c.eval_every = c.checkpoint_every = 4
  c.optim.warmup_steps = 2
  return c
