"""The bias study's figures, drawn from the study dict (`baq.study.bias.report.analyze`).

  accuracy_vs_bits.png  one panel per quantizer family: each group's accuracy
                        (bootstrap intervals) against average bits, the float
                        model's dotted;
  pareto.png            overall vs worst-group accuracy with the Pareto front
                        of each nominal budget, and worst group vs bits.

`pareto_front` is the pure part; the plots only read the dict.
"""

from __future__ import annotations

import numpy as np

from baq import workdir as wd


def _family(setting: str) -> str:
  return setting.rsplit("_", 1)[0]


def plot_accuracy_vs_bits(path: str, out: dict) -> None:
  """One panel per quantizer: each group's accuracy (CI bars) against average bits.

  Args:
    path: the PNG to write.
    out: the study dict (`report.analyze`).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fams = list(dict.fromkeys(_family(n) for n in out["settings"]))
  cols = min(len(fams), 4)
  rows = -(-len(fams) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), sharey=True,
                           squeeze=False)
  for ax in axes.flat[len(fams):]:
    ax.set_visible(False)
  colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(out["group_names"])))
  for ax, fam in zip(axes.flat, fams):
    sts = sorted((st for n, st in out["settings"].items() if _family(n) == fam),
                 key=lambda st: st["avg_bits"])
    x = np.array([st["avg_bits"] for st in sts])
    dodge = 0.03 * max(np.ptp(x), 2.0)  # groups side by side at one budget
    for g, name in enumerate(out["group_names"]):
      y = np.array([st["groups"][g]["accuracy"] for st in sts])
      bounds = np.array([[st["groups"][g]["low"], st["groups"][g]["high"]] for st in sts])
      err = np.abs(bounds.T - y)
      ax.errorbar(x + dodge * (g - (len(colors) - 1) / 2), 100 * y, yerr=100 * err,
                  color=colors[g], marker="o", ms=3, capsize=2, label=name)
      ax.axhline(100 * out["float"]["accuracy"][g], color=colors[g], ls=":", lw=0.8)
    ax.set(title=fam, xlabel="average bits")
    ax.set_xticks(sorted(set(np.round(x, 2))))
  for row in axes:
    row[0].set_ylabel(f"group accuracy (%), dotted: {wd.FLOAT}")
  axes.flat[len(fams) - 1].legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def pareto_front(points: np.ndarray) -> np.ndarray:
  """Indices of the points not dominated when every column is maximised.

  Args:
    points: [n, d] values, higher is better in every column.

  Returns:
    int64 indices, ascending, of the points no other point dominates (at least
    as good everywhere and better somewhere); equal points all stay.
  """
  p = np.asarray(points, np.float64)
  keep = [i for i in range(len(p))
          if not np.any(np.all(p >= p[i], 1) & np.any(p > p[i], 1))]
  return np.asarray(keep, np.int64)


def plot_pareto(path: str, out: dict) -> None:
  """Overall vs worst-group accuracy (fronts per budget), and worst group vs bits.

  Args:
    path: the PNG to write.
    out: the study dict (`report.analyze`).
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(out["settings"])
  acc = np.array([out["settings"][n]["accuracy"]["value"] for n in names]) * 100
  worst = np.array([out["settings"][n]["worst_group_accuracy"] for n in names]) * 100
  bits = np.array([out["settings"][n]["avg_bits"] for n in names])
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
  cmap = plt.get_cmap("plasma")
  scale = lambda v: cmap((v - bits.min()) / max(np.ptp(bits), 1e-9) * 0.85)
  for nominal in sorted(set(out["settings"][n]["bits"] for n in names)):
    idx = np.array([i for i, n in enumerate(names) if out["settings"][n]["bits"] == nominal])
    front = idx[pareto_front(np.stack([acc[idx], worst[idx]], 1))]
    front = front[np.argsort(acc[front])]
    a.plot(acc[front], worst[front], "-", color=scale(nominal), lw=1,
           label=f"front at {nominal:g} bits")
  a.scatter(acc, worst, c=[scale(v) for v in bits], s=25, zorder=3)
  for i, n in enumerate(names):
    a.annotate(n, (acc[i], worst[i]), fontsize=6, xytext=(3, 2), textcoords="offset points")
  a.scatter([100 * out["float"]["overall"]], [100 * out["float"]["worst_group_accuracy"]],
            marker="*", s=120, c="k", label=wd.FLOAT, zorder=4)
  a.set(xlabel="overall accuracy (%)", ylabel="worst-group accuracy (%)")
  a.legend(fontsize=7)
  front = pareto_front(np.stack([-bits, worst], 1))
  front = front[np.argsort(bits[front])]
  b.scatter(bits, worst, c=[scale(v) for v in bits], s=25)
  b.plot(bits[front], worst[front], "k-", lw=1, label="front (fewer bits, better worst group)")
  for i, n in enumerate(names):
    b.annotate(n, (bits[i], worst[i]), fontsize=6, xytext=(3, 2), textcoords="offset points")
  b.axhline(100 * out["float"]["worst_group_accuracy"], color="k", ls=":", lw=0.8, label=wd.FLOAT)
  b.set(xlabel="average bits", ylabel="worst-group accuracy (%)")
  b.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
