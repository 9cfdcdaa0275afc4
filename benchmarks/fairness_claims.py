r"""The main job over seeds, plus BAQ at a second budget: mean and spread.

  python -m benchmarks.fairness_claims --root=/tmp/baq_claims [--seeds=0,1,2]

For each seed it runs the main job (`configs/default.py`: float, uniform 8-
and 4-bit QAT, BAQ at `quant.target_bits`) in ROOT/seed<S>, then BAQ at each
budget of --extra_bits fine-tuned from that seed's float model in
ROOT/seed<S>_b<B>. Several methods at once: `--config.mode=fair_static,baq`
(with --extra_bits= to skip the second budget). Everything resumes: a rerun only trains what is missing.
It prints, per method, mean +- standard deviation over seeds of accuracy,
worst-group accuracy, best-minus-worst gap and average bits, then the
comparisons the BAQ issue asks for, seed by seed, then (--per_group) the
equal-opportunity and equalized-odds gaps and each group's accuracy. Config overrides go through
--config, e.g. `--config.steps=600`.
"""

import os
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from baq.train import experiment

config_flags.DEFINE_config_file("config", "configs/default.py", "Base config.")
flags.DEFINE_string("root", None, "Directory of all runs.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
flags.DEFINE_list("extra_bits", ["5.0"], "Further BAQ budgets (average bits).")
flags.DEFINE_bool("per_group", True, "Also print EOpp, EOdds and per-group accuracy.")
flags.mark_flags_as_required(["root"])
FLAGS = flags.FLAGS
KEYS = ("accuracy", "worst_group_accuracy", "accuracy_gap", "avg_bits")
GROUP_NAMES = []  # of the test split, filled by run_seed


def run_seed(seed: int) -> dict:
  """name -> metrics of every method of one seed."""
  config = FLAGS.config.copy_and_resolve_references()
  config.seed = seed
  main_dir = os.path.join(FLAGS.root, f"seed{seed}")
  t = time.time()
  report = experiment.run(config, main_dir)
  methods = dict(report["methods"])
  GROUP_NAMES[:] = report["group_names"]
  print(f"seed {seed}: main job took {time.time() - t:.0f} s (including resumed parts)")
  for bits in map(float, FLAGS.extra_bits):
    extra = config.copy_and_resolve_references()
    extra.quant.target_bits = bits
    extra.baselines = ""
    extra.init_checkpoint = os.path.join(main_dir, experiment.FLOAT)
    report = experiment.run(extra, os.path.join(FLAGS.root, f"seed{seed}_b{bits:g}"))
    methods[f"{experiment.method_name(extra)}@{bits:g}"] = report["methods"][
        experiment.method_name(extra)]
  for mode in experiment.modes(config):
    base = experiment.method_name(config, mode)
    methods[f"{base}@{config.quant.target_bits:g}"] = methods.pop(base)
  return methods


def main(argv):
  del argv
  experiment.quiet_logging()
  seeds = [int(s) for s in FLAGS.seeds]
  runs = {s: run_seed(s) for s in seeds}
  names = list(runs[seeds[0]])
  print(f"\nMean +- std over seeds {seeds} (test split, percent; bits unscaled)")
  print(f"{'method':16s}" + "".join(f"{k:>24s}" for k in KEYS))
  for name in names:
    cells = []
    for k in KEYS:
      v = np.array([runs[s][name][k] for s in seeds]) * (1 if k == "avg_bits" else 100)
      cells.append(f"{v.mean():>15.2f} +- {v.std():5.2f}")
    print(f"{name:16s}" + "".join(cells))
  base = [n for n in names if "@" in n]
  print("\nPer seed: worst-group accuracy (acc) of each method vs the uniform baselines")
  for s in seeds:
    r = runs[s]
    line = " ".join(f"{n}={100 * r[n]['worst_group_accuracy']:.2f} "
                    f"({100 * r[n]['accuracy']:.2f})"
                    for n in [b for b in ("uniform8", "uniform4") if b in r] + base)
    print(f"  seed {s}: {line}")
  if FLAGS.per_group:
    print_per_group(runs, seeds, names)


def print_per_group(runs: dict, seeds: list, names: list) -> None:
  """Mean +- std over seeds of EOpp, EOdds and each group's accuracy (percent)."""
  cols = ["EOpp", "EOdds"] + list(GROUP_NAMES)
  print("\nFairness gaps and per-group accuracy, mean +- std over seeds (percent)")
  print(f"{'method':16s}" + "".join(f"{c:>16s}" for c in cols))
  for name in names:
    vals = np.array([[runs[s][name]["equal_opportunity_gap"],
                      runs[s][name]["equalized_odds_gap"]] +
                     list(runs[s][name]["group_accuracy"]) for s in seeds]) * 100
    print(f"{name:16s}" + "".join(f"{m:>8.2f} +- {d:5.2f}"
                                  for m, d in zip(vals.mean(0), vals.std(0))))


if __name__ == "__main__":
  app.run(main)
