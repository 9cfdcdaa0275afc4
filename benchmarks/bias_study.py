r"""The bias study in one command: runs (or resumes) the grid, prints the verdicts.

  python -m benchmarks.bias_study --config=configs/bias_study.py --root=/tmp/baq_study

Every (quantizer, bits, seed) cell goes to ROOT/<cell>/ and is skipped once
finished, so an interrupted study resumes; the analysis is redone from the
cells each time and written to ROOT/study.json, ROOT/accuracy_vs_bits.png and
ROOT/pareto.png (see baq/study.py and baq/study_report.py). Overrides go
through --config, e.g. `--config.steps=200 --config.study.seeds="(0,1,2)"`.
"""

import time

from absl import app, flags
from ml_collections import config_flags

from baq.train import experiment
from baq.study import runner as study

config_flags.DEFINE_config_file("config", "configs/bias_study.py", "Study config.")
flags.DEFINE_string("root", None, "Directory of the study (cells, study.json, plots).")
flags.mark_flags_as_required(["root"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  experiment.quiet_logging()
  t = time.time()
  study.run_study(FLAGS.config, FLAGS.root)
  print(f"bias study: {time.time() - t:.0f} s (finished cells were skipped)", flush=True)


if __name__ == "__main__":
  app.run(main)
