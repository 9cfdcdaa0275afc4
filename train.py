"""Trains a baq experiment: flags in, one library call.

  python train.py --config=configs/default.py --workdir=/tmp/baq_default

Overrides: any config field, e.g. --config.quant.target_bits=5.0.
"""

from absl import app, flags
from ml_collections import config_flags

from baq import host
from baq.train import experiment

config_flags.DEFINE_config_file("config", "configs/default.py", "Experiment config file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  host.tune_allocator()  # before JAX starts its threads
  if not flags.FLAGS["verbosity"].present:
    experiment.quiet_logging()
  experiment.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
