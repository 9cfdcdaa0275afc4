"""The allocation protocol's table: spreads, paired tests with Holm, oracle ranks, noise.

For each budget, every row (uniform QAT at the integers around it and at 8
bits, and each arm) gets mean +- std over seeds of test worst-group accuracy
and accuracy, its average bits, and its search and training seconds. Each
row is paired, seed by seed, against the reference arm (the static Hessian
allocation at equal steps) and against uniform QAT at the budget rounded up:
the per-seed worst-group differences are tested across seeds with a paired
t-test (the training noise of each seed is in them), and every p-value of
the table is adjusted together by Holm's method. Beside each row's spread
over seeds stands the test split's own sampling error of the worst group,
sqrt(p (1 - p) / n), so the two sources of variance can be told apart. Where
the oracle arm ran (every budget-filling allocation trained), each arm's
allocation is placed among those, and each pair of allocations is told how
many units' bits they differ in (per seed).
"""

from __future__ import annotations

import math
from typing import Optional

import ml_collections
import numpy as np
from scipy import stats as sps

from baq import workdir as wd
from baq.stats import corrections, significance


def _rows_at(runs: dict, budget: float, seeds) -> list[str]:
  first = runs[seeds[0]]
  uni = sorted((n for n in first if n.startswith(wd.UNIFORM)), key=wd.parse_uniform)
  keep = {math.floor(budget), math.ceil(budget), 8}
  uni = [n for n in uni if wd.parse_uniform(n) in keep]
  arms = [n for n in first if n.endswith(f"@{budget:g}")]
  return [n for n in uni + arms if all(n in runs[s] for s in seeds)]


def _worst_index(result: dict) -> int:
  acc = result["test"]["group_accuracy"]
  return int(np.argmin(acc))


# The paired tests `protocol.test` may name (their p-values are Holm-adjusted), as printed.
TESTS = {"t": "paired t", "wilcoxon": "exact Wilcoxon"}

def summarize(config: ml_collections.ConfigDict, root: str, runs: dict, test) -> dict:
  """The protocol's summary (what WORKDIR/summary.json holds).

  Args:
    config: the protocol config.
    root: the protocol's workdir (for the arms' test correctness).
    runs: seed -> {row: result} (`protocol.run_seed`).
    test: the test split (its groups and sizes).

  Returns:
    {"budgets": {budget: {"rows": {...}, "comparisons": [...]}}, "seeds", ...}.
  """
  seeds = sorted(runs)
  counts = np.bincount(test.groups, minlength=test.num_groups)
  out = dict(seeds=seeds, test_size=int(test.labels.size), group_names=list(test.group_names),
             group_counts=counts.tolist(), reference=config.protocol.reference, budgets={})
  tests = []
  for budget in (float(b) for b in config.protocol.budgets):
    rows = {}
    for name in _rows_at(runs, budget, seeds):
      r = [runs[s][name] for s in seeds]
      worst = np.array([x["test"]["worst_group_accuracy"] for x in r])
      n_worst = np.array([counts[_worst_index(x)] for x in r])
      rows[name] = dict(
          worst=worst.tolist(), accuracy=[x["test"]["accuracy"] for x in r],
          validation_worst=[x["validation"]["worst_group_accuracy"] for x in r],
          avg_bits=float(np.mean([x["avg_bits"] for x in r])),
          search_seconds=float(np.mean([x.get("search_seconds") or 0.0 for x in r])),
          train_seconds=float(np.mean([x.get("train_seconds") or 0.0 for x in r])),
          search_steps=int(r[0].get("search_steps", 0)),
          sampling_se=float(np.mean(np.sqrt(worst * (1 - worst) / n_worst))),
          selected=[x.get("selected") for x in r])
    ref = f"{config.protocol.reference}@{budget:g}"
    up = wd.uniform_name(math.ceil(budget))
    comparisons = []
    for against in (ref, up):
      if against not in rows:
        continue
      for name in rows:
        if name == against or name.startswith(wd.UNIFORM):
          continue
        diff = np.array(rows[name]["worst"]) - np.array(rows[against]["worst"])
        acc = np.array(rows[name]["accuracy"]) - np.array(rows[against]["accuracy"])
        t = significance.across_seeds(diff)
        comparisons.append(dict(row=name, against=against, worst_diff=diff.tolist(),
                                accuracy_diff=acc.tolist(), t_p=t["t_p"],
                                wilcoxon_p=t["wilcoxon_p"], note=t["note"],
                                detectable=detectable(diff, float(config.protocol.alpha)),
                                units_differ=_units_differ(runs, seeds, name, against)))
        tests.append(comparisons[-1])
    out["budgets"][f"{budget:g}"] = dict(rows=rows, comparisons=comparisons,
                                         oracle=_oracle_ranks(runs, budget, seeds))
  test_name = config.protocol.get("test", "t")
  key = f"{test_name}_p"  # the p-value significance.across_seeds gives: t_p or wilcoxon_p
  p = np.array([1.0 if np.isnan(c[key]) else c[key] for c in tests])
  for c, adj in zip(tests, corrections.holm(p) if p.size else []):
    c["holm_p"] = float(adj)
  out["holm_family"] = len(tests)
  out["test"] = test_name
  out["goal"] = _goal(out, float(config.protocol.alpha))
  return out


def _units_differ(runs: dict, seeds, name: str, against: str) -> Optional[list[int]]:
  """Per seed, the units whose bits differ between two arms' allocations (None
  where either arm has no allocation of its own, as uniform QAT)."""
  pairs = [(runs[s][name].get("bits"), runs[s][against].get("bits")) for s in seeds]
  if any(a is None or b is None or np.ndim(a) != 1 or np.shape(a) != np.shape(b)
         for a, b in pairs):  # uniform QAT's "bits" is its one bit-width
    return None
  return [int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in pairs]


def detectable(diff, alpha: float = 0.05, power: float = 0.8) -> float:
  """The mean paired difference a two-sided t-test over these seeds would find with
  probability `power` at level `alpha`, given their spread (before Holm):
  (t_{1-alpha/2} + t_{power}) * sd / sqrt(n), with n - 1 degrees of freedom."""
  d = np.asarray(diff, np.float64)
  if d.size < 2:
    return float("nan")
  dof = d.size - 1
  return float((sps.t.ppf(1 - alpha / 2, dof) + sps.t.ppf(power, dof)) * d.std(ddof=1)
               / np.sqrt(d.size))


def _oracle_ranks(runs: dict, budget: float, seeds) -> dict:
  """Per seed: the oracle's best test worst group, and each arm's allocation's rank."""
  key = f"oracle@{budget:g}"
  out = {}
  for s in seeds:
    if key not in runs[s]:
      continue
    cands = runs[s][key]["candidates"]
    scores = np.array([c["test"]["worst_group_accuracy"] for c in cands])
    ranks = {}
    for name, r in runs[s].items():
      if not name.endswith(f"@{budget:g}") or name == key or "bits" not in r:
        continue
      match = [i for i, c in enumerate(cands) if c["bits"] == r["bits"]]
      if match:
        ranks[name] = dict(rank=int(np.sum(scores > scores[match[0]])) + 1, of=len(cands))
    out[str(s)] = dict(best_test=float(scores.max()), selected_test=float(
        runs[s][key]["test"]["worst_group_accuracy"]), ranks=ranks)
  return out


def _goal(summary: dict, alpha: float) -> list[str]:
  """Rows that beat both the reference and uniform (budget rounded up), Holm p < alpha,
  with accuracy within 1 point of uniform 8-bit."""
  winners = []
  for b, entry in summary["budgets"].items():
    u8 = entry["rows"].get(wd.uniform_name(8))
    for name in entry["rows"]:
      cs = [c for c in entry["comparisons"] if c["row"] == name]
      if len(cs) == 2 and all(np.mean(c["worst_diff"]) > 0 and c.get("holm_p", 1) < alpha
                              for c in cs):
        if u8 is None or np.mean(entry["rows"][name]["accuracy"]) >= np.mean(u8["accuracy"]) - 0.01:
          winners.append(name)
  return winners


def _ms(v) -> str:
  v = 100 * np.asarray(v, np.float64)
  return f"{v.mean():6.2f} ± {v.std(ddof=1) if v.size > 1 else 0.0:4.2f}"


def format_summary(summary: dict) -> str:
  """The table of every budget, its paired tests, oracle ranks and the goal's verdict."""
  lines = [f"seeds {summary['seeds']}, test {summary['test_size']} images "
           f"(groups {dict(zip(summary['group_names'], summary['group_counts']))})"]
  for b, entry in summary["budgets"].items():
    lines += ["", f"budget {b} bits: test worst group and accuracy, mean ± std over seeds",
              f"{'row':<16}{'worst group':>16}{'accuracy':>16}{'bits':>7}{'seed sd':>9}"
              f"{'test se':>9}{'search s':>10}{'train s':>9}"]
    for name, r in entry["rows"].items():
      lines.append(f"{name:<16}{_ms(r['worst']):>16}{_ms(r['accuracy']):>16}"
                   f"{r['avg_bits']:>7.3f}{100 * np.std(r['worst'], ddof=1):>9.2f}"
                   f"{100 * r['sampling_se']:>9.2f}{r['search_seconds']:>10.1f}"
                   f"{r['train_seconds']:>9.1f}")
    lines.append("paired worst-group differences (row minus against), per seed; paired t and "
                 "exact Wilcoxon (W) tests across seeds, Holm over the whole table; "
                 "detectable: the mean difference this spread lets the t-test find 80 % of "
                 "the time")
    for c in entry["comparisons"]:
      d = 100 * np.asarray(c["worst_diff"])
      differ = c.get("units_differ")
      lines.append(f"  {c['row']:<14} - {c['against']:<12} {d.mean():+6.2f} "
                   f"[{' '.join(f'{x:+.1f}' for x in d)}]  t p={c['t_p']:.3f} "
                   f"W p={c['wilcoxon_p']:.3f} "
                   f"Holm p={c.get('holm_p', float('nan')):.3f}  detectable "
                   f"{100 * c['detectable']:.2f}"
                   + (f"  units differing {np.mean(differ):.1f}" if differ else ""))
    ref = next((c["against"] for c in entry["comparisons"]
                if not c["against"].startswith(wd.UNIFORM)), None)
    top = entry["rows"].get(wd.uniform_name(8))
    if ref and top:  # what any allocation at this budget could still win, at most
      lines.append(f"  headroom: uniform8 minus {ref} worst group "
                   f"{100 * (np.mean(top['worst']) - np.mean(entry['rows'][ref]['worst'])):+.2f}")
    for s, o in entry["oracle"].items():
      ranks = ", ".join(f"{k} {v['rank']}/{v['of']}" for k, v in o["ranks"].items())
      lines.append(f"  oracle seed {s}: best test worst {100 * o['best_test']:.2f}, selected on "
                   f"validation {100 * o['selected_test']:.2f}; ranks by test: {ranks}")
  lines += ["", f"Holm family: {summary['holm_family']} tests, "
            f"{TESTS[summary.get('test', 't')]} p-values. Beats both the static "
            f"allocation and uniform QAT (Holm p < 0.05, accuracy within 1 point of uniform8): "
            f"{', '.join(summary['goal']) or 'none'}"]
  return "\n".join(lines)
