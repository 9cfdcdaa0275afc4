"""The CLIP bias study in one command.

  python -m baq.study.vlm --config=configs/vlm.py --workdir=/tmp/baq_vlm

Seeds are `config.seeds` (--config.seeds="(0,1,2)"); see baq.study.vlm.study
for what WORKDIR holds.
"""

from absl import app

from baq import launch
from baq.study.vlm import study

launch.define_flags("configs/vlm.py", config_help="Study config.",
                    workdir_help="Directory of the study (one folder per seed, summary.json).")


def main(argv):
  config, workdir = launch.start(argv, check=study.check)
  study.run(config, workdir)


if __name__ == "__main__":
  app.run(main)
