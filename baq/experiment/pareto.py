r"""The Pareto benchmark: worst-group accuracy and accuracy against average bits, over seeds.

  python -m baq.experiment.pareto --workdir=/tmp/baq_pareto [--budgets=2.5,3,4] \
    [--uniform=2,3,4,8] [--config=configs/default.py] [--config.seeds="(0,1,2)"]

For each of `config.seeds` it trains (or resumes), with `experiment.run`:
  WORKDIR/seed<S>                  the float model and uniform QAT at each of
                                --uniform (with `fair_static`, the importance
                                allocation at the config's budget, no training)
  WORKDIR/seed<S>_b<B>_penalty     fair_static_qat and BAQ at budget B with the
                                config's penalties
  WORKDIR/seed<S>_b<B>_nopenalty   the same with every fairness penalty's weight
                                0 (the bitrate constraint stays)
  WORKDIR/seed<S>_b<B>_<V>_equal   with --equal_steps (the default) and BAQ's
                                separate search (`quant.search_steps`):
                                fair_static_qat trained `steps + search_steps`
                                steps, BAQ's total, reported as
                                `fair_static_qat-equal@<B>`
so allocations are compared with allocations and penalties with penalties,
at the same budget, steps and seeds. It prints mean +- std over seeds of
accuracy, worst-group accuracy, gap and average bits for every method
(`<method>@<B>` with the penalties, `<method>@<B>-nopen` without), and
draws WORKDIR/pareto.png (`wd.PARETO_PLOT`): worst-group accuracy and accuracy against average
bits, mean and standard deviation over seeds.
"""

from __future__ import annotations

from typing import Optional, Sequence

from absl import app, flags
import ml_collections
import numpy as np

from baq import launch, progress
from baq.fairness import regularizers
from baq.experiment import checks, job as experiment, sweep
from baq import workdir as wd

METHODS = "fair_static_qat,baq"
VARIANTS = {"penalty": "", "nopenalty": "-nopen"}
EQUAL = "equal"  # the equal-total-steps control's suffix (directory and method name)


def equal_steps_control(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """`fair_static_qat` trained as many steps as BAQ in total, or None without a search.

  BAQ with `quant.search_steps` trains `search_steps + steps` steps (search,
  then the deployed bits), `fair_static_qat` only `steps`; the control gives
  the static allocation the same total, so the comparison is of allocations.
  """
  search = config.quant.get("search_steps")
  if search is None:
    return None
  c = config.copy_and_resolve_references()
  c.mode, c.baselines = "fair_static_qat", ""
  c.steps = int(config.steps) + int(search)
  return c


def without_fairness_penalties(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the weight of every penalty that does not act on the bits set to 0.

  Measured rounding (`quant.rounding_loss`) then minimises the mean loss, not
  the worst group's.
  """
  c = config.copy_and_resolve_references()
  for name, entry in c.penalties.to_dict().items():
    entry = dict(entry)
    entry.pop("weight", None)
    if not regularizers.build(entry.pop("kind", name), **entry).needs_bits:
      c.penalties[name].weight = 0.0
  if "rounding_loss" in c.quant:  # measured rounding then minimises the groups' mean loss
    c.quant.rounding_loss = "mean"
  return c


def run_seed(config: ml_collections.ConfigDict, root: str, seed: int,
             budgets: Sequence[float], uniform: Sequence[int], equal_steps: bool = True,
             p: Optional[progress.Progress] = None) -> dict:
  """Every run of one seed (resumed where finished); name -> test metrics.

  Args:
    config: the base config.
    root: the benchmark's directory.
    seed: the training seed.
    budgets: average-bit budgets of the allocation methods.
    uniform: bit-widths of the uniform QAT baselines.
    equal_steps: also train `equal_steps_control` at each budget and variant.
    p: the benchmark's progress (a line per run, `runs_per_seed` of them), or None.

  Returns:
    Method name -> its report entry.
  """
  c = config.copy_and_resolve_references()
  c.seed = seed
  c.mode, c.baselines = "fair_static", ",".join(wd.uniform_name(b) for b in uniform)
  main_dir = wd.seed_dir(root, seed)
  methods = {k: v for k, v in experiment.run(c, main_dir)["methods"].items()
             if not k.endswith(wd.PTQ_SUFFIX)}  # QAT against QAT; the PTQ rows are in the reports
  methods[f"fair_static{sweep.AT}{c.quant.target_bits:g}"] = methods.pop("fair_static")
  done = (lambda label: p.done(f"seed {seed}, {label}")) if p is not None else (lambda _: None)
  done("float and uniform QAT")
  for bits in budgets:
    for variant, suffix in VARIANTS.items():
      v = c if variant == "penalty" else without_fairness_penalties(c)
      v = v.copy_and_resolve_references()
      v.mode, v.baselines, v.init_checkpoint = METHODS, "", wd.float_dir(c, main_dir)
      v.quant.target_bits, v.quant.target_bytes = float(bits), None
      report = experiment.run(v, wd.variant_dir(root, seed, bits, variant))
      for mode in METHODS.split(","):
        name = wd.method_name(v, mode)
        methods[f"{name}{sweep.AT}{bits:g}{suffix}"] = report["methods"][name]
      done(f"{bits:g} bits, {variant}")
      control = equal_steps_control(v) if equal_steps else None
      if control is not None:
        report = experiment.run(control, f"{wd.variant_dir(root, seed, bits, variant)}_{EQUAL}")
        name = wd.method_name(control, control.mode)
        methods[f"{name}-{EQUAL}{sweep.AT}{bits:g}{suffix}"] = report["methods"][name]
        done(f"{bits:g} bits, {variant}, equal steps")
  return methods


def runs_per_seed(config: ml_collections.ConfigDict, budgets: Sequence[float],
                  equal_steps: bool = True) -> int:
  """How many `experiment.run` calls `run_seed` makes (the progress lines' total)."""
  control = equal_steps and config.quant.get("search_steps") is not None
  return 1 + len(budgets) * len(VARIANTS) * (2 if control else 1)


def plot(path: str, runs: dict[int, dict], seeds: Sequence[int]) -> None:
  """Worst-group accuracy and accuracy against average bits: mean +- std over seeds."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  families = {}
  for name in runs[seeds[0]]:
    family = name.split(sweep.AT)[0] + ("-nopen" if name.endswith("-nopen") else "")
    if name.startswith(wd.UNIFORM):
      family = "uniform QAT"
    families.setdefault(family, []).append(name)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, key, title in ((axes[0], "worst_group_accuracy", "worst-group accuracy"),
                         (axes[1], "accuracy", "accuracy")):
    for i, (family, names) in enumerate(families.items()):
      if family == wd.FLOAT:
        continue
      # A small offset per family keeps points at the same budget apart.
      bits = [np.mean([runs[s][n]["avg_bits"] for s in seeds]) + 0.03 * (i - 3) for n in names]
      vals = np.array([[100 * runs[s][n][key] for s in seeds] for n in names])
      order = np.argsort(bits)
      ax.errorbar(np.array(bits)[order], vals.mean(1)[order], yerr=vals.std(1)[order],
                  marker="o", capsize=3, label=family, ls="--" if "nopen" in family else "-")
    fvals = [100 * runs[s][wd.FLOAT][key] for s in seeds]
    ax.axhline(np.mean(fvals), color="k", ls=":", lw=0.8, label="fp32")
    ax.set_xlabel("average bits (weights)")
    ax.set_ylabel(f"{title} (%)")
    ax.set_title(f"{title}, mean +- std over seeds {list(seeds)}")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _define_flags() -> None:
  launch.define_flags("configs/default.py", config_help="Base config (seeds: config.seeds).",
                      workdir_help="Directory of all runs (WORKDIR/seed<S>, ...).")
  flags.DEFINE_list("budgets", ["2.5", "3", "4"], "Budgets of the allocation methods.")
  flags.DEFINE_list("uniform", ["2", "3", "4", "8"], "Bit-widths of uniform QAT.")
  flags.DEFINE_bool("equal_steps", True, "Also train fair_static_qat for BAQ's total steps "
                    "(search + fine-tune) at each budget: the equal-steps control.")


def main(argv: Sequence[str]) -> None:
  """Runs every seed of the config, prints the table and writes WORKDIR/pareto.png."""
  config, root = launch.start(argv, check=checks.validate)
  f = flags.FLAGS
  seeds, uniform = launch.seeds(config), [int(b) for b in f.uniform]
  budgets = [float(b) for b in f.budgets]
  p = progress.Progress("pareto", len(seeds) * runs_per_seed(config, budgets, f.equal_steps),
                        unit="run")
  runs = {s: run_seed(config, root, s, budgets, uniform, f.equal_steps, p) for s in seeds}
  if not launch.is_primary():
    return
  print("\n" + sweep.format_summary(runs, seeds))
  print("\n" + sweep.format_per_seed(runs, seeds, [wd.uniform_name(b) for b in uniform]))
  plot(wd.path(root, wd.PARETO_PLOT), runs, seeds)
  print(f"plot: {wd.path(root, wd.PARETO_PLOT)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
