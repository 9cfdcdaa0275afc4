r"""The seed sweep: the main job over seeds, plus BAQ at further budgets: mean and spread.

  python -m baq.experiment.sweep --workdir=/tmp/baq_claims [--extra_bits=5.0] \
    [--config=configs/default.py] [--config.seeds="(0,1,2)"]

For each seed it runs the main job (`experiment.run` of --config, by default
configs/default.py: float, uniform 8- and 4-bit QAT, BAQ at
`quant.target_bits`) in WORKDIR/seed<S>, for each of `config.seeds`, then each method of `config.mode` at
each budget of --extra_bits (average bits), fine-tuned from that seed's float
model, in WORKDIR/seed<S>_b<B> (`baq.workdir` names both). Several methods
at once: `--config.mode=fair_static,baq` (--extra_bits= skips the further
budgets). Everything resumes: a rerun only trains what is missing.

It prints, per method (the budgeted ones named `<method>@<bits>`), mean +-
standard deviation over seeds of accuracy, worst-group accuracy,
best-minus-worst gap and average bits; then, seed by seed, each budgeted
method's worst-group accuracy against the uniform baselines'; then
(--per_group) the equal-opportunity and equalized-odds gaps and each group's
accuracy. Config overrides go through --config, e.g. `--config.steps=600`.
The printing is done by pure functions of the per-seed report dicts
(`seed_methods`, `format_summary`, `format_per_seed`, `format_per_group`).
"""

from __future__ import annotations

from typing import Optional, Sequence

from absl import app, flags
import ml_collections
import numpy as np

from baq import launch, progress
from baq.experiment import checks, job as experiment
from baq import workdir as wd
from baq.train.modes import selected

KEYS = ("accuracy", "worst_group_accuracy", "accuracy_gap", "avg_bits")
AT = "@"  # "<method>@<bits>": a method at one budget


def budget_label(config: ml_collections.ConfigDict) -> str:
  """The budget of `config` as the tables name it.

  Args:
    config: a config with `quant.target_bits` or `quant.target_bytes`.

  Returns:
    "4" for 4.0 average bits, "120000B" for a size budget.
  """
  q = config.quant
  return f"{q.target_bits:g}" if q.target_bytes is None else f"{q.target_bytes:g}B"


def seed_methods(config: ml_collections.ConfigDict, main: dict,
                 extra: dict[float, dict]) -> dict:
  """name -> metrics of every method of one seed.

  Args:
    config: the seed's config (its `mode` names the budgeted methods).
    main: the main job's report (`experiment.run`).
    extra: further budget (average bits) -> that run's report.

  Returns:
    The main report's methods in order, each method of `config.mode`
    renamed `<name>@<budget>`, after those of the further budgets.
  """
  names = [wd.method_name(config, m) for m in selected(config)]
  methods = dict(main["methods"])
  for bits, report in extra.items():
    for name in names:
      methods[f"{name}{AT}{bits:g}"] = report["methods"][name]
  for name in names:
    methods[f"{name}{AT}{budget_label(config)}"] = methods.pop(name)
  return methods


def format_summary(runs: dict[int, dict], seeds: Sequence[int]) -> str:
  """Mean +- std over seeds of KEYS, one line per method (percent; bits unscaled).

  Args:
    runs: seed -> `seed_methods` of that seed.
    seeds: the seeds, in order.

  Returns:
    The table, a heading line first.
  """
  width = max([16] + [len(n) + 1 for n in runs[seeds[0]]])
  lines = [f"Mean +- std over seeds {list(seeds)} (test split, percent; bits unscaled)",
           f"{'method':{width}s}" + "".join(f"{k:>24s}" for k in KEYS)]
  for name in runs[seeds[0]]:
    cells = []
    for k in KEYS:
      v = np.array([runs[s][name][k] for s in seeds]) * (1 if k == "avg_bits" else 100)
      cells.append(f"{v.mean():>15.2f} +- {v.std():5.2f}")
    lines.append(f"{name:{width}s}" + "".join(cells))
  return "\n".join(lines)


def format_per_seed(runs: dict[int, dict], seeds: Sequence[int],
                    baselines: Sequence[str]) -> str:
  """Per seed: worst-group (and overall) accuracy of the baselines and budgeted methods.

  Args:
    runs: seed -> `seed_methods` of that seed.
    seeds: the seeds, in order.
    baselines: the baselines' names (those missing are left out).

  Returns:
    A heading line and one line per seed.
  """
  budgeted = [n for n in runs[seeds[0]] if AT in n]
  lines = ["Per seed: worst-group accuracy (acc) of each method vs the uniform baselines"]
  for s in seeds:
    r = runs[s]
    line = " ".join(f"{n}={100 * r[n]['worst_group_accuracy']:.2f} "
                    f"({100 * r[n]['accuracy']:.2f})"
                    for n in [b for b in baselines if b in r] + budgeted)
    lines.append(f"  seed {s}: {line}")
  return "\n".join(lines)


def format_per_group(runs: dict[int, dict], seeds: Sequence[int],
                     group_names: Sequence[str]) -> str:
  """Mean +- std over seeds of EOpp, EOdds and each group's accuracy (percent).

  Args:
    runs: seed -> `seed_methods` of that seed.
    seeds: the seeds, in order.
    group_names: the test split's groups.

  Returns:
    The table, a heading line first.
  """
  cols = ["EOpp", "EOdds"] + list(group_names)
  lines = ["Fairness gaps and per-group accuracy, mean +- std over seeds (percent)",
           f"{'method':16s}" + "".join(f"{c:>16s}" for c in cols)]
  for name in runs[seeds[0]]:
    vals = np.array([[runs[s][name]["equal_opportunity_gap"],
                      runs[s][name]["equalized_odds_gap"]] +
                     list(runs[s][name]["group_accuracy"]) for s in seeds]) * 100
    lines.append(f"{name:16s}" + "".join(f"{m:>8.2f} +- {d:5.2f}"
                                         for m, d in zip(vals.mean(0), vals.std(0))))
  return "\n".join(lines)


def run_seed(config: ml_collections.ConfigDict, root: str, seed: int,
             extra_bits: Sequence[float], p: Optional[progress.Progress] = None
             ) -> tuple[dict, list]:
  """Runs (or resumes) one seed's main job and its further budgets.

  Args:
    config: the base config.
    root: the sweep's directory.
    seed: the training seed.
    extra_bits: further BAQ budgets (average bits).
    p: the sweep's progress (a line per run), or None.

  Returns:
    (`seed_methods` of the seed, the test split's group names).
  """
  c = config.copy_and_resolve_references()
  c.seed = seed
  main_dir = wd.seed_dir(root, seed)
  main = experiment.run(c, main_dir)
  if p is not None:
    p.done(f"seed {seed}, main job")
  extra = {}
  for bits in extra_bits:
    e = c.copy_and_resolve_references()
    e.quant.target_bits, e.quant.target_bytes = bits, None
    e.baselines = ""
    e.init_checkpoint = wd.float_dir(c, main_dir)
    extra[bits] = experiment.run(e, wd.budget_dir(root, seed, bits))
    if p is not None:
      p.done(f"seed {seed}, budget {bits:g}")
  return seed_methods(c, main, extra), list(main["group_names"])


def _define_flags() -> None:
  # Defined only when run as a program, so importing this module (the tests,
  # beside other entry points' flags) registers none.
  launch.define_flags("configs/default.py", config_help="Base config (seeds: config.seeds).",
                      workdir_help="Directory of all runs (WORKDIR/seed<S>, ...).")
  flags.DEFINE_list("extra_bits", ["5.0"], "Further BAQ budgets (average bits).")
  flags.DEFINE_bool("per_group", True, "Also print EOpp, EOdds and per-group accuracy.")


def main(argv: Sequence[str]) -> None:
  """Runs every seed of the config, then prints the tables (process 0)."""
  config, root = launch.start(argv, check=checks.validate)
  f = flags.FLAGS
  seeds = launch.seeds(config)
  runs, group_names = {}, []
  extra = [float(b) for b in f.extra_bits]
  # A resumed run finishes fast and counts in the estimate: it errs short.
  p = progress.Progress("sweep", len(seeds) * (1 + len(extra)), unit="run")
  for s in seeds:
    runs[s], group_names = run_seed(config, root, s, extra, p)
  if not launch.is_primary():
    return
  baselines = wd.baseline_names(config)  # uniform<B> and runtime baselines alike
  print("\n" + format_summary(runs, seeds))
  print("\n" + format_per_seed(runs, seeds, baselines))
  if f.per_group:
    print("\n" + format_per_group(runs, seeds, group_names))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
