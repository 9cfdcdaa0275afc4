r"""Paired tests between two methods' finished runs, one pair per seed.

  python -m baq.study.compare \
    --runs=R/seed0_b3_penalty_baqsearch:baq,R/seed1_b3_penalty_baqsearch:baq,... \
    --against=R/seed0:uniform3,R/seed1:uniform3,...

Each entry is WORKDIR:METHOD, where METHOD is `fp32`, a uniform baseline
(`uniform<B>`, read from WORKDIR/uniform<B>), a runtime baseline (`nf4`,
`llm_int8`, ...: fp32 under that runtime's matmul) or a mode of the
workdir's config (deployed at its integer bits, as the report evaluates it). Entry i
of --runs is paired with entry i of --against (the same seed); both must
be evaluated on the same test examples. Printed, for the runs minus the
reference (`baq.stats.significance`):
  * each group's accuracy change, pooled over the pairs, with its paired
    bootstrap interval (examples resampled within groups) and p-value;
  * the overall change;
  * the exact McNemar test of each pair;
  * the worst-group difference of each pair, and the t and Wilcoxon tests
    of those differences across seeds (3 seeds cannot give a Wilcoxon p
    below 0.25);
  * Holm's adjustment of the group p-values (`--holm` tests in the family).
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags
import numpy as np

from baq import launch
from baq.models import build_model
from baq.quant.inject import QuantMode
from baq.stats import corrections, significance as stats
from baq.experiment import checks, deploy, job as experiment, runtime_baselines
from baq import workdir as wd
from baq.train.checkpoint import restore_variables
from baq.train.evaluate import predict_logits
from baq.train.modes import get_mode


def correct(entry: str) -> tuple[np.ndarray, object]:
  """(per-example correctness on the test split, the split) of WORKDIR:METHOD."""
  workdir, _, method = entry.rpartition(":")
  if not workdir:
    raise ValueError(f"{entry!r}: expected WORKDIR:METHOD (e.g. /tmp/w:baq).")
  config = checks.load_config(workdir)
  test = experiment.load_data(config)["test"]
  kw = config.model.kwargs.to_dict()
  if method == wd.FLOAT:
    model = build_model(config.model.name, test.num_classes, None, **kw)
    variables = restore_variables(wd.float_dir(config, workdir))
  elif wd.is_runtime(method):  # a runtime baseline: fp32's weights under its matmul
    model = runtime_baselines.model(config, method, test.num_classes)
    variables = restore_variables(wd.float_dir(config, workdir))
  elif method.startswith(wd.UNIFORM):
    bits = wd.parse_uniform(method)
    model = build_model(config.model.name, test.num_classes,
                        get_mode(config, "qat", bits).quantizer.replace(mode=QuantMode.EVAL), **kw)
    variables = restore_variables(wd.path(workdir, method))
  else:
    model, _, variables, *_ = deploy.deployed_run(config, workdir, method, test.num_classes)
  logits = predict_logits(model, variables, test, config.eval_batch_size)
  return (logits.argmax(-1) == test.labels).astype(np.float64), test


def _worst(c: np.ndarray, groups: np.ndarray, num_groups: int) -> float:
  return min(c[groups == g].mean() for g in range(num_groups) if (groups == g).any())


def compare(runs: Sequence[str], against: Sequence[str], num_samples: int = 2000,
            holm: int = 0) -> dict:
  """The paired tests of `runs` minus `against` (lists of WORKDIR:METHOD)."""
  if len(runs) != len(against) or not runs:
    raise ValueError(f"--runs has {len(runs)} entries and --against {len(against)}: "
                     "pair them one to one (one pair per seed).")
  a, b, test = [], [], None
  for r, ref in zip(runs, against):
    ca, ta = correct(r)
    cb, tb = correct(ref)
    if not (np.array_equal(ta.labels, tb.labels) and np.array_equal(ta.groups, tb.groups)):
      raise ValueError(f"{r} and {ref} were not evaluated on the same test examples.")
    if test is not None and not np.array_equal(test.groups, ta.groups):
      raise ValueError(f"{r}: a different test split from the first pair's.")
    a.append(ca)
    b.append(cb)
    test = ta
  a, b = np.stack(a), np.stack(b)
  g, n = test.groups, test.num_groups
  change = stats.paired_change(a, b, g, n, num_samples=num_samples, seed=0)
  worst = [_worst(x, g, n) - _worst(y, g, n) for x, y in zip(a, b)]
  p = np.asarray(change["change_p"], np.float64)
  family = max(holm, n)
  adjusted = corrections.holm(np.concatenate([p, np.ones(family - n)]))[:n]
  return dict(group_names=list(test.group_names), change=change,
              mcnemar_p=[stats.mcnemar_exact(y, x)["p_value"] for x, y in zip(a, b)],
              worst_group_diff=worst, across_seeds=stats.across_seeds(worst),
              holm_p=list(adjusted), holm_family=family)


def format_result(r: dict) -> str:
  c = r["change"]
  lines = ["group: change (pooled) [95% interval] p, Holm p"]
  for i, name in enumerate(r["group_names"]):
    lines.append(f"  {name}: {100 * c['change'][i]:+.2f} [{100 * c['change_low'][i]:+.2f}, "
                 f"{100 * c['change_high'][i]:+.2f}] p={c['change_p'][i]:.3f}, "
                 f"Holm p={r['holm_p'][i]:.3f} (of {r['holm_family']})")
  s = r["across_seeds"]
  lines += [f"overall: {100 * c['overall']:+.2f} p={c['overall_p']:.3f}",
            "McNemar p per pair: " + " / ".join(f"{p:.2f}" for p in r["mcnemar_p"]),
            "worst-group difference per pair: " + " / ".join(
                f"{100 * d:+.2f}" for d in r["worst_group_diff"]),
            f"across seeds: mean {100 * s['mean']:+.2f}, t p={s['t_p']:.2f}, "
            f"Wilcoxon p={s['wilcoxon_p']:.2f} {s['note']}".rstrip()]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  launch.start(argv)
  f = flags.FLAGS
  if launch.is_primary():
    print(format_result(compare(f.runs, f.against, f.num_samples, f.holm)))


if __name__ == "__main__":
  flags.DEFINE_list("runs", None, "WORKDIR:METHOD entries, one per seed.")
  flags.DEFINE_list("against", None, "The reference WORKDIR:METHOD entries, paired in order.")
  flags.DEFINE_integer("num_samples", 2000, "Bootstrap replicates.")
  flags.DEFINE_integer("holm", 0, "Tests in the Holm family (default: the groups).")
  flags.mark_flags_as_required(["runs", "against"])
  app.run(main)
