"""Trains a baq experiment: flags in, one library call.

  python train.py --config=configs/default.py --workdir=/tmp/baq_default

Overrides: any config field, e.g. --config.quant.target_bits=5.0. Several
hosts: start one process per host with JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or under SLURM, Open MPI or a TPU
pod slice); `baq.launch.start` starts `jax.distributed` first.
"""

from absl import app

from baq import launch
from baq.experiment import checks, job

launch.define_flags("configs/default.py", config_help="Experiment config file.",
                    workdir_help="Directory for checkpoints, metrics and reports.")


def main(argv):
  config, workdir = launch.start(argv, check=checks.validate)
  job.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
