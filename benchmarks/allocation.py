"""Time of the exact allocator on 1,000 units with 6 bit-width choices.

  python -m benchmarks.allocation [--units=1000] [--repeats=5]

Random per-channel-like instances (numel multiples of 9, sensitivities
falling with bits), the exact solver as `solve` picks it (an ILP at this
size) and FairQuant's quantile baseline,
median wall time over repeats. Target: the exact allocator under 1 s.
"""

import time

from absl import app, flags
import numpy as np

from baq.allocation import solver

flags.DEFINE_integer("units", 1000, "Units to allocate.")
flags.DEFINE_integer("repeats", 5, "Timed instances.")
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


if __name__ == "__main__":
  app.run(main)
