"""Several seeds' runs at once: `jax.vmap` over train states against runs in order and in lanes.

  python -m benchmarks.seeds_vmap [--seeds=2] [--steps=30] [--regime=channel_a4]

The allocation protocol trains many independent fixed-bit runs of one shape
(every arm of every seed: the same model, quantizer and batch size, another
allocation or start). Three ways to train `seeds` of them, side by side in
one process, on the protocol regime's own train step (`create_train_state`
in mode fair_static_qat and `make_train_step`, each run with its own start,
bits and batches):

  * in order: one jitted step per run, the runs one after another;
  * lanes: the same steps in `baq.experiment.lanes` threads, two at a time
    (what the protocol does on a CPU);
  * vmap: one jitted step of `jax.vmap(step)` over the stacked states and
    batches.

Printed: each way's run-steps per second (the median of `repeats` timed
stretches of `steps` steps after compilation) and the ratios to in order.
vmap's results equal the runs in order up to float reassociation, which
the script checks (max abs difference of the parameters after the timed
steps). Measured figures are in docs/performance.md.
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from baq.experiment import lanes
from baq.train import state as train_state
from baq.train.step import make_train_step
from configs import protocol

flags.DEFINE_integer("seeds", 2, "Runs trained at once.")
flags.DEFINE_integer("steps", 30, "Steps per timed stretch.")
flags.DEFINE_integer("repeats", 3, "Timed stretches per way (the median is printed).")
flags.DEFINE_string("regime", "channel_a4", "A regime of configs/protocol.py.")
FLAGS = flags.FLAGS


def _setup(config, seed: int):
  c = config.copy_and_resolve_references()
  c.seed = seed
  s = train_state.create_train_state(c, "fair_static_qat", num_classes=3, num_groups=6,
                                     image_shape=(32, 32, 3), steps=1000, lr=1e-3)
  step = make_train_step(s.model, s.tx, s.penalties, s.layers, num_groups=6, budget=s.budget,
                         bit_bounds=None, freeze_bits=True)
  return s.state, step


def _batches(seed: int, n: int, b: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.normal(size=(n, b, 32, 32, 3)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 3, (n, b)), jnp.int32),
          "group": jnp.asarray(rng.integers(0, 6, (n, b)), jnp.int32)}


def _copy(tree):
  return jax.tree.map(jnp.array, tree)


def main(argv):
  del argv
  config = protocol.get_config(FLAGS.regime)
  n, k, b = FLAGS.seeds, FLAGS.steps, config.batch_size
  runs = [_setup(config, s) for s in range(n)]
  step = jax.jit(runs[0][1])  # one program: every run has the model's shapes
  data = [_batches(s, k, b) for s in range(n)]
  vstep = jax.jit(jax.vmap(runs[0][1]))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[r[0] for r in runs])
  vdata = jax.tree.map(lambda *xs: jnp.stack(xs, 1), *data)  # [steps, seeds, ...]

  def one_run(i, out):
    state = _copy(runs[i][0])
    for t in range(k):
      state, _ = step(state, jax.tree.map(lambda x, t=t: x[t], data[i]))
    out[i] = jax.block_until_ready(state)

  def in_order():
    out = {}
    for i in range(n):
      one_run(i, out)
    return out

  def in_lanes():
    out = {}
    lanes.run_lanes([[lambda i=i: one_run(i, out)] for i in range(n)], 2)
    return out

  def vmapped():
    state = _copy(stacked)
    for t in range(k):
      state, _ = vstep(state, jax.tree.map(lambda x, t=t: x[t], vdata))
    return jax.block_until_ready(state)

  ways = {"in order": in_order, "lanes": in_lanes, "vmap": vmapped}
  for fn in ways.values():
    fn()  # compile
  times = {name: [] for name in ways}
  for _ in range(FLAGS.repeats):  # interleaved, so load drifts hit every way alike
    for name, fn in ways.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  got = {name: n * k / float(np.median(ts)) for name, ts in times.items()}
  print(f"{FLAGS.regime}: {n} runs of {k} steps, batch {b}, {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)")
  for name, rate in got.items():
    print(f"  {name:9s} {rate:7.1f} run-steps/s  ({rate / got['in order']:.2f}x in order)")
  seq, vm = in_order(), vmapped()
  diff = max(float(jnp.abs(a - c[i]).max())
             for i in range(n)
             for a, c in zip(jax.tree.leaves(seq[i]["params"]), jax.tree.leaves(vm["params"])))
  print(f"  vmap against in order: max abs parameter difference {diff:.2e}")


if __name__ == "__main__":
  app.run(main)
