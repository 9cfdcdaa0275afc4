r"""The bias study in one command: runs (or resumes) the grid, prints the verdicts.

  python -m baq.study --config=configs/bias_study.py --root=/tmp/baq_study

Every (quantizer, bits, seed) cell goes to ROOT/<cell>/ and is skipped once
finished, so an interrupted study resumes; the analysis is redone from the
cells each time and written to ROOT/study.json, ROOT/accuracy_vs_bits.png and
ROOT/pareto.png (see baq.study.runner and baq.study.report). Overrides go
through --config, e.g. `--config.steps=200 --config.study.seeds="(0,1,2)"`;
the config must have a `study` section (configs/bias_study.py's).
"""

import time

from absl import app, flags
from ml_collections import config_flags

from baq import host
from baq.study import runner
from baq.train import experiment

config_flags.DEFINE_config_file("config", "configs/bias_study.py", "Study config.")
flags.DEFINE_string("root", None, "Directory of the study (cells, study.json, plots).")
flags.mark_flags_as_required(["root"])
FLAGS = flags.FLAGS


def main(argv):
  """Runs the study of --config in --root and prints how long it took."""
  del argv
  host.tune_allocator()  # before JAX starts its threads
  experiment.quiet_logging()
  t = time.time()
  runner.run_study(FLAGS.config, FLAGS.root)
  print(f"bias study: {time.time() - t:.0f} s (finished cells were skipped)", flush=True)


if __name__ == "__main__":
  app.run(main)
