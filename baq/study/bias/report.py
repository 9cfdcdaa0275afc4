"""The bias study's analysis: per-group tests, corrections, verdicts and the table.

`analyze` reads the finished cells of a study root (`baq.study.bias.runner`) and, for
every quantized setting, compares its seeds with the float model of the same
seeds on the same test examples (`baq.stats.significance`):
  * per-group and overall accuracy, seeds averaged, with bootstrap intervals;
  * the change vs float per group and relative to the overall change, paired
    bootstrap over examples (resampled within groups, seeds kept together),
    with two-sided p-values; per seed, the exact McNemar test;
  * the per-seed relative changes tested across seeds (t and Wilcoxon), with
    the few-seed caveat in `note`;
  * p-values corrected across all (setting, group) pairs (`correction`), one
    family for the change tests and one for the relative tests, and a verdict
    per (setting, group) by `verdict_rule` (see `corrections.verdicts`);
  * MaxSkew/MinSkew@k of the test examples ranked by positive-class
    probability (seed means).
`write` adds ROOT/study.json and the figures (`baq.study.bias.plots`) and prints
the verdict table (`format_table`).
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from baq.fairness.metrics import skew_at_k
from baq.stats import corrections, significance as stats
from baq.study.bias import plots
from baq import workdir as wd

SHORT = {"amplified": "A", "reduced": "R", "no significant change": " "}


def load_cell(root: str, name: str, test) -> dict:
  """A finished cell's correctness, logits and metrics; checks the split.

  Args:
    root: the study root.
    name: the cell's name (`wd.cell_name`).
    test: the test split it must have been evaluated on.

  Returns:
    dict(correct [n] 0/1 floats, logits [n, C], metrics: its metrics.json).

  Raises:
    ValueError: the cell holds predictions of other test examples.
  """
  d = wd.path(root, name)
  with np.load(wd.path(d, wd.PREDICTIONS_FILE)) as z:
    logits, labels, groups = z["logits"], z["labels"], z["groups"]
  if not (np.array_equal(labels, test.labels) and np.array_equal(groups, test.groups)):
    raise ValueError(f"{d} was evaluated on other test examples than {test.name}.")
  metrics = wd.read_json(wd.path(d, wd.CELL_METRICS_FILE))
  return dict(correct=(logits.argmax(-1) == labels).astype(np.float64), logits=logits,
              metrics=metrics)


def _skew(logits_list, test, s, positive_class: int) -> dict:
  out = {}
  for k in s.skew_k:
    per = []
    for logits in logits_list:
      z = logits - logits.max(-1, keepdims=True)
      prob = np.exp(z[:, positive_class]) / np.exp(z).sum(-1)
      per.append(skew_at_k(prob, test.groups, test.num_groups, k, s.skew_smoothing))
    out[f"@{k}"] = dict(max_skew=float(np.mean([p["max_skew"] for p in per])),
                        min_skew=float(np.mean([p["min_skew"] for p in per])),
                        skew=np.mean([p["skew"] for p in per], 0).tolist())
  return out


def _per_seed(correct: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
  """[S, G] group accuracies of [S, n] correctness (NaN for empty groups)."""
  n = np.bincount(groups, minlength=num_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.stack([np.bincount(groups, c, num_groups) / n for c in correct])


def _group_rows(s, test, seeds: list, cq: np.ndarray, cf: np.ndarray, d_seed: np.ndarray,
                acc: dict, chg: dict) -> list[dict]:
  """One setting's per-group rows: accuracy, change tests, McNemar, across seeds.

  `cq`/`cf` are the [S, n] correctness of the setting and the float model,
  `d_seed` the [S, G] per-seed group changes, `acc`/`chg` the setting's
  `group_accuracy_ci` and `paired_change`.
  """
  groups = test.groups
  rel_seed = d_seed - (cq.mean(1) - cf.mean(1))[:, None]
  rows = []
  for g in range(test.num_groups):
    m = groups == g
    rows.append(dict(
        group=g, name=test.group_names[g], count=int(m.sum()),
        **{k: acc[k][g] for k in ("accuracy", "low", "high")},
        **{k: chg[k][g] for k in chg if isinstance(chg[k], list)},
        mcnemar=[dict(seed=x, **stats.mcnemar_exact(cf[i, m], cq[i, m]))
                 for i, x in enumerate(seeds)],
        change_per_seed=d_seed[:, g].tolist(), relative_per_seed=rel_seed[:, g].tolist(),
        across_seeds_change=stats.across_seeds(d_seed[:, g], s.significance),
        across_seeds_relative=stats.across_seeds(rel_seed[:, g], s.significance)))
  return rows


def analyze(s, root: str, cells: Sequence, test, positive_class: int = 1) -> dict:
  """The study dict: float, settings (per group: tests and verdicts), cells.

  Args:
    s: the study options (`runner.settings`).
    root: the study root, every cell of `cells` and each seed's float cell
      finished.
    cells: the quantized cells (`runner.grid`).
    test: the test split.
    positive_class: the class whose probability ranks the skew@k.

  Returns:
    The dict written to ROOT/study.json (its `definitions` say what each
    number is).
  """
  G, groups, B = test.num_groups, test.groups, int(s.num_bootstrap)
  seeds = [int(x) for x in s.seeds]
  flo = [load_cell(root, wd.cell_name(wd.FLOAT, x), test) for x in seeds]
  cf = np.stack([c["correct"] for c in flo])
  f_seed = _per_seed(cf, groups, G)
  out = dict(dataset=test.name, num_examples=len(test), group_names=list(test.group_names),
             group_count=np.bincount(groups, minlength=G).tolist(), seeds=seeds,
             study=s.to_dict(), cells={}, settings={})
  out["float"] = dict(stats.group_accuracy_ci(cf, groups, G, B, s.level),
                      worst_group_accuracy=float(np.nanmin(f_seed, 1).mean()),
                      accuracy_gap=float((np.nanmax(f_seed, 1) - np.nanmin(f_seed, 1)).mean()),
                      skew=_skew([c["logits"] for c in flo], test, s, positive_class))
  for x, c in zip(seeds, flo):
    out["cells"][wd.cell_name(wd.FLOAT, x)] = c["metrics"]
  names = list(dict.fromkeys(c.setting for c in cells))
  for name in names:
    cs = sorted((c for c in cells if c.setting == name), key=lambda c: seeds.index(c.seed))
    loaded = [load_cell(root, c.name, test) for c in cs]
    cq = np.stack([c["correct"] for c in loaded])
    for c, l in zip(cs, loaded):
      out["cells"][c.name] = l["metrics"]
    acc = stats.group_accuracy_ci(cq, groups, G, B, s.level)
    chg = stats.paired_change(cq, cf, groups, G, B, s.level)
    q_seed = _per_seed(cq, groups, G)
    rows = _group_rows(s, test, seeds, cq, cf, q_seed - f_seed, acc, chg)
    out["settings"][name] = dict(
        quantizer=cs[0].quantizer, bits=cs[0].bits, alpha=cs[0].alpha,
        avg_bits=float(np.mean([l["metrics"]["avg_bits"] for l in loaded])),
        cells=[c.name for c in cs],
        accuracy=dict(value=acc["overall"], low=acc["overall_low"], high=acc["overall_high"]),
        worst_group_accuracy=float(np.nanmin(q_seed, 1).mean()),
        accuracy_gap=float((np.nanmax(q_seed, 1) - np.nanmin(q_seed, 1)).mean()),
        change={k: chg[k] for k in chg if k.startswith("overall")},
        mcnemar=[dict(seed=x, **stats.mcnemar_exact(cf[i], cq[i])) for i, x in enumerate(seeds)],
        skew=_skew([l["logits"] for l in loaded], test, s, positive_class), groups=rows)
  _correct_and_judge(out, s)
  return out


def _correct_and_judge(out: dict, s) -> None:
  """Adjusts p-values across every (setting, group) and fills in the verdicts."""
  rows = [r for st in out["settings"].values() for r in st["groups"]]
  for key in ("change", "relative"):
    adj = corrections.adjust([r[f"{key}_p"] for r in rows], s.correction)
    for r, p in zip(rows, adj):
      r[f"{key}_p_adj"] = float(p)
  v = corrections.verdicts([r["change"] for r in rows], [r["change_p_adj"] for r in rows],
                           [r["relative"] for r in rows], [r["relative_p_adj"] for r in rows],
                           s.significance, s.verdict_rule)
  for r, x in zip(rows, v):
    r["verdict"] = x
  out["verdicts"] = {n: [r["verdict"] for r in st["groups"]]
                     for n, st in out["settings"].items()}
  out["verdict_counts"] = {x: int(sum(r["verdict"] == x for r in rows))
                           for x in corrections.VERDICTS}
  out["definitions"] = dict(
      change="group accuracy of the setting minus the float model's, same seeds and "
             "examples, seeds averaged",
      relative="change minus the whole test set's change; < 0: the group lost more",
      p="two-sided, paired bootstrap over test examples (within groups, seeds kept "
        "together), Wald with the bootstrap SE; *_p_adj corrected by "
        f"{s.correction} over all (setting, group) pairs",
      verdict=f"rule {s.verdict_rule!r} at adjusted p < {s.significance}: "
              "see baq.stats.corrections.verdicts",
      ptq="rtn/gptq/fair_gptq: symmetric per-channel absmax grid, weights only",
      skew="MaxSkew/MinSkew@k of the test set ranked by positive-class probability, "
           f"additive smoothing {s.skew_smoothing}, seed means")


def format_table(out: dict) -> str:
  """Settings by rows: accuracy, worst group, then each group's change and verdict.

  Args:
    out: the study dict (`analyze`).

  Returns:
    The table, a caption line first (points, i.e. percent).
  """
  names = out["group_names"]
  head = (f"{'setting':22s} {'bits':>5s} {'acc':>6s} {'dacc':>6s} {'worst':>6s} "
          f"{'dworst':>6s} {'gap':>6s} |" + "".join(f"{n[:7]:>9s}" for n in names))
  f = out["float"]
  lines = [f"Change vs {wd.FLOAT} in points (seeds {out['seeds']}, {out['dataset']}, "
           f"n={out['num_examples']}); A amplified, R reduced "
           f"({out['study']['verdict_rule']}, {out['study']['correction']}-adjusted "
           f"p < {out['study']['significance']})", head, "-" * len(head),
           f"{wd.FLOAT:22s} {32.0:5.2f} {100 * f['overall']:6.2f} {'':>6s} "
           f"{100 * f['worst_group_accuracy']:6.2f} {'':>6s} {100 * f['accuracy_gap']:6.2f} |"
           + "".join(f"{100 * a:9.2f}" for a in f["accuracy"])]
  for n, st in out["settings"].items():
    cells = "".join(f"{100 * r['change']:+7.2f} {SHORT[r['verdict']]}" for r in st["groups"])
    lines.append(
        f"{n:22s} {st['avg_bits']:5.2f} {100 * st['accuracy']['value']:6.2f} "
        f"{100 * st['change']['overall']:+6.2f} {100 * st['worst_group_accuracy']:6.2f} "
        f"{100 * (st['worst_group_accuracy'] - f['worst_group_accuracy']):+6.2f} "
        f"{100 * st['accuracy_gap']:6.2f} |{cells}")
  lines.append("verdicts: " + ", ".join(f"{k} {v}" for k, v in out["verdict_counts"].items()))
  return "\n".join(lines)


def write(s, root: str, cells: Sequence, test, positive_class: int = 1) -> dict:
  """Analyzes, writes ROOT/study.json and the figures, prints the table.

  Args: those of `analyze`.

  Returns:
    The study dict.
  """
  out = analyze(s, root, cells, test, positive_class)
  path = wd.path(root, wd.STUDY_FILE)
  with open(path, "w") as f:
    json.dump(out, f, indent=1, default=float)  # numpy scalars as floats
  plots.plot_accuracy_vs_bits(wd.path(root, wd.STUDY_ACCURACY_PLOT), out)
  plots.plot_pareto(wd.path(root, wd.STUDY_PARETO_PLOT), out)
  print(format_table(out), flush=True)
  print(f"study: {path}", flush=True)
  return out
