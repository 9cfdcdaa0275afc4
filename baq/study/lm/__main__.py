"""The language-model bias study in one command.

  python -m baq.study.lm --config=configs/lm.py --workdir=/tmp/baq_lm

Seeds are `config.seeds` (--config.seeds="(0,1,2)"); see baq.study.lm.study
for what WORKDIR holds.
"""

from absl import app

from baq import launch
from baq.study.lm import study

launch.define_flags("configs/lm.py", config_help="Study config.",
                    workdir_help="Directory of the study (one folder per seed, summary.json).")


def main(argv):
  config, workdir = launch.start(argv, check=study.check)
  study.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
