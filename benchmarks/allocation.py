"""Time of the exact allocator on 1,000 units with 6 bit-width choices.

  python -m benchmarks.allocation [--units=1000] [--repeats=5] [--groups=6]

Random per-channel-like instances (numel multiples of 9, sensitivities
falling with bits), the exact solver as `solve` picks it (an ILP at this
size) and FairQuant's quantile baseline,
median wall time over repeats. Target: the exact allocator under 1 s.
Then the exact minimax allocator (`baq.allocation.minimax`, every group
kept) on `--groups` groups whose sensitivities agree up to a lognormal
factor of spread 0.3 per (group, unit), once at `--units` and once at the
per-channel SmallCNN's size (179 units), each beside the reduced knapsack
(`max` over groups, then `solve`) on the same table.
"""

import time

from absl import app, flags
import numpy as np

from baq.allocation import minimax, solver

flags.DEFINE_integer("units", 1000, "Units to allocate.")
flags.DEFINE_integer("repeats", 5, "Timed instances.")
flags.DEFINE_integer("groups", 6, "Groups of the minimax allocator.")
flags.DEFINE_integer("minimax_repeats", 1, "Timed minimax instances per size.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  times = {"auto": [], "quantile": []}
  picked = set()
  rng = np.random.default_rng(0)
  c = np.asarray(solver.DEFAULT_CHOICES, float)
  for _ in range(FLAGS.repeats):
    numel = 9 * rng.integers(8, 512, FLAGS.units)
    s = rng.lognormal(0, 1, (FLAGS.units, 1)) * 4.0 ** -c[None, :]
    target = float(rng.uniform(3, 6))
    picked.add(solver.auto_method(numel, target))
    t = time.perf_counter()
    bits = solver.solve(s, numel, target)
    times["auto"].append(time.perf_counter() - t)
    assert (numel * bits).sum() <= target * numel.sum() + 1e-9
    t = time.perf_counter()
    solver.quantile_assignment(-s[:, 0], numel, target)
    times["quantile"].append(time.perf_counter() - t)
  print(f"{FLAGS.units} units x {len(c)} choices, median of {FLAGS.repeats}:")
  for m, ts in times.items():
    print(f"  {m:8s} {np.median(ts):8.3f} s")
  print(f"exact allocator ({'/'.join(sorted(picked))}): {np.median(times['auto']):.3f} s "
        "(target < 1 s)")
  for n in (FLAGS.units, 179):
    _minimax(rng, n, FLAGS.groups, c)


def _minimax(rng, n: int, groups: int, c: np.ndarray) -> None:
  """Minimax vs reduced-knapsack time and worst-group total on [groups, n, K]."""
  times, worst = {"minimax": [], "max+solve": []}, {"minimax": [], "max+solve": []}
  for _ in range(FLAGS.minimax_repeats):
    numel = 9 * rng.integers(8, 512, n)
    s = (rng.lognormal(0, 0.3, (groups, n, 1)) * rng.lognormal(0, 1, (1, n, 1))
         * 4.0 ** -c[None, None, :])
    target = float(rng.uniform(3, 6))
    for name, fn in (("minimax", lambda: minimax.solve_minimax(s, numel, target)),
                     ("max+solve", lambda: solver.solve(s.max(0), numel, target))):
      t = time.perf_counter()
      bits = fn()
      times[name].append(time.perf_counter() - t)
      assert (numel * bits).sum() <= target * numel.sum() + 1e-9
      worst[name].append(minimax.group_totals(s, bits).max())
  ratio = np.median(np.asarray(worst["minimax"]) / np.asarray(worst["max+solve"]))
  print(f"{n} units x {len(c)} choices x {groups} groups, median of {FLAGS.minimax_repeats}: "
        f"minimax {np.median(times['minimax']):.3f} s, max+solve "
        f"{np.median(times['max+solve']):.3f} s; worst group minimax / max+solve {ratio:.4f}")


if __name__ == "__main__":
  app.run(main)
