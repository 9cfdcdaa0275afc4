r"""Training throughput (examples/s) of the trainer's sharded update step.

  python -m benchmarks.throughput                   # default config, 1 vs 8 fake CPU devices
  python -m benchmarks.throughput --model=resnet18  # ResNet-18, BAQ vs float, real devices

Without --model (or with --model=small_cnn) it times the default config's
BAQ step (SmallCNN, batch 128, 32x32) on 1 and on 8 devices, each in a
subprocess of its own with XLA_FLAGS=--xla_force_host_platform_device_count,
and prints examples/s and their ratio. Fake CPU devices share the machine's
cores, so the ratio measures the cost of partitioning the step (collectives,
smaller per-device work), not a speed-up.

With --model=resnet18 it times the float step and the BAQ step of ResNet-18
(224x224, batch 128 by default) on the machine's own devices (a GPU, all of
a host's accelerators with a data-parallel mesh) and prints examples/s and
BAQ's fraction of the float rate. Both steps are the trainer's own
(`make_train_step` jitted by `baq.train.sharding.jit_step` over `config.mesh`).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags  # pylint: disable=g-import-not-at-top
import numpy as np

flags.DEFINE_string("model", "small_cnn", "Registered model (small_cnn: 1 vs 8 CPU devices).")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("image_size", 0, "Image side; 0: 32 for small_cnn, 224 otherwise.")
flags.DEFINE_integer("num_classes", 3, "Logits.")
flags.DEFINE_integer("steps", 10, "Steps per timed run.")
flags.DEFINE_integer("repeats", 5, "Timed runs (the median is reported).")
flags.DEFINE_string("devices", "1,8", "Fake CPU device counts to compare (small_cnn).")
flags.DEFINE_integer("mesh_model", 1, "Devices on the mesh's model axis.")
flags.DEFINE_string("worker", "", "Internal: JSON arguments of one measurement.")
FLAGS = flags.FLAGS
NUM_GROUPS = 6


def measure(model: str, mode: str, batch_size: int, image_size: int, num_classes: int,
            steps: int, repeats: int, mesh_model: int) -> dict:
  """Median examples/s of `mode`'s update step on this process's devices."""
  import jax  # pylint: disable=import-outside-toplevel
  from baq.train import sharding as sh, state as train_state, loop as trainer  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  config.mesh.model = mesh_model
  if model != config.model.name:
    config.model.name, config.model.kwargs = model, {}
  mesh = sh.make_mesh(config)
  setup = train_state.create_train_state(
      config, mode, num_classes=num_classes, num_groups=NUM_GROUPS,
      image_shape=(image_size, image_size, 3), steps=1000, lr=1e-3)
  shardings = sh.state_shardings(mesh, setup.state, config, trainer.SHARDING_RULES)
  state = sh.put(setup.state, shardings)
  step, _ = trainer.jit_steps(config, setup, mesh, shardings, num_groups=NUM_GROUPS)
  rng = np.random.default_rng(0)
  batch = sh.shard_batch({
      "image": rng.normal(size=(batch_size, image_size, image_size, 3)).astype(np.float32),
      "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
      "group": rng.integers(0, NUM_GROUPS, batch_size).astype(np.int32)}, mesh)
  t = time.perf_counter()
  for _ in range(2):  # compile and warm up
    state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t
  rates = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    rates.append(batch_size * steps / (time.perf_counter() - t))
  return dict(examples_per_s=float(np.median(rates)), devices=mesh.devices.size,
              platform=jax.devices()[0].platform, device_kind=jax.devices()[0].device_kind,
              compile_s=compile_s, loss=float(m["loss"]))


def run_worker(args: dict, cpu_devices: int = 0) -> dict:
  """`measure(**args)` in a subprocess (with `cpu_devices` fake CPU devices if > 0)."""
  env = dict(os.environ)
  if cpu_devices:
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={cpu_devices}",
               JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "benchmarks.throughput",
                        f"--worker={json.dumps(args)}"], env=env, capture_output=True, text=True,
                       cwd=root)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.worker:
    print(json.dumps(measure(**json.loads(FLAGS.worker))), flush=True)
    return
  size = FLAGS.image_size or (32 if FLAGS.model == "small_cnn" else 224)
  args = dict(model=FLAGS.model, batch_size=FLAGS.batch_size, image_size=size,
              num_classes=FLAGS.num_classes, steps=FLAGS.steps, repeats=FLAGS.repeats,
              mesh_model=FLAGS.mesh_model)
  if FLAGS.model == "small_cnn":
    counts = [int(n) for n in FLAGS.devices.split(",")]
    res = {n: run_worker(dict(args, mode="baq"), cpu_devices=n) for n in counts}
    for n, r in res.items():
      print(f"baq step, {n} CPU device(s): {r['examples_per_s']:9.1f} examples/s "
            f"(compile {r['compile_s']:.1f} s)")
    print(f"ratio {counts[-1]} / {counts[0]} devices: "
          f"{res[counts[-1]]['examples_per_s'] / res[counts[0]]['examples_per_s']:.3f}")
  else:
    res = {m: run_worker(dict(args, mode=m)) for m in ("float", "baq")}
    r = res["float"]
    print(f"{FLAGS.model} {size}x{size} batch {FLAGS.batch_size} on {r['devices']} x "
          f"{r['device_kind']} ({r['platform']})")
    for m, r in res.items():
      print(f"  {m:5s} step: {r['examples_per_s']:9.1f} examples/s (compile {r['compile_s']:.1f} s)")
    print(f"  baq / float: {res['baq']['examples_per_s'] / res['float']['examples_per_s']:.3f}")


if __name__ == "__main__":
  app.run(main)
