r"""The bias study in one command: runs (or resumes) the grid, prints the verdicts.

  python -m baq.study.bias --config=configs/bias_study.py --workdir=/tmp/baq_study

Every (quantizer, bits, seed) cell goes to WORKDIR/<cell>/ and is skipped once
finished, so an interrupted study resumes; the analysis is redone from the
cells each time and written to WORKDIR/study.json, WORKDIR/accuracy_vs_bits.png
and WORKDIR/pareto.png (see baq.study.bias.runner and baq.study.bias.report).
Overrides go through --config, e.g. `--config.steps=200 --config.seeds="(0,1,2)"`;
the config must have a `study` section (configs/bias_study.py's).
"""

import time

from absl import app

from baq import launch
from baq.study.bias import runner

launch.define_flags("configs/bias_study.py", config_help="Study config.",
                    workdir_help="Directory of the study (cells, study.json, plots).")


def main(argv):
  """Runs the study of --config in --workdir and prints how long it took."""
  config, workdir = launch.start(argv, check=runner.settings)
  t = time.time()
  runner.run_study(config, workdir)
  if launch.is_primary():
    print(f"bias study: {time.time() - t:.0f} s (finished cells were skipped)", flush=True)


if __name__ == "__main__":
  app.run(main)
