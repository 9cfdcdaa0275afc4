r"""Accelerator figures: bf16 train steps (float vs BAQ), input vs step, 1 vs all devices.

On a GPU machine (sized to finish in under 5 minutes on one H200, most of
it compilation; not yet run on one: no GPU was lent as of 2026-12-01):

  python -m benchmarks.accelerator --out=/tmp/accel.json

  # and with grain workers for the input pipeline as well:
  python -m benchmarks.accelerator --out=/tmp/accel.json --workers=8

On CPU, the same code shrunk (tiny widths, 32 px, batch 8, 2 steps, 1
repeat; tests/test_accelerator_bench.py runs it on 2 fake devices):

  python -m benchmarks.accelerator --smoke

It prints JSON lines (also written to --out), one per figure:

  * "env": device kind, platform, device count, jax version, date, settings;
  * "step", per model (resnet18 and deit_tiny at 224 px, `model.dtype`
    bfloat16, batch 128): examples/s of the float train step and of the BAQ
    per-channel step (the default config's diffq parametrization, scales and
    penalties), timed side by side in one process after compilation
    (interleaved repeats, median), and baq_over_float;
  * "input": the input pipeline alone (the trainer's `Batcher` with
    `augment.PAPER_RECIPE` on synthetic uint8 images held in memory, inline
    and, with --workers, in grain workers) in images/s, and its ratio to each
    measured step's images/s: >= 1 means the input keeps up with the device;
  * "devices": ResNet-18's BAQ step on 1 device against all of them, the
    batch sharded over the trainer's data mesh (`baq.train.sharding`), at
    --batch_size per device; or a note that only one device exists.

Every step is the trainer's own: `state.create_train_state`, then
`trainer.jit_steps` over `sharding.make_mesh(config)` with its state shardings.
"""

import dataclasses
import datetime
import json
import sys
import time

from absl import app, flags
import jax
import numpy as np

from baq.data import augment
from baq.data.datasets import Split
from baq.data.pipeline import Batcher, batches
from baq.train import sharding as sh, state as train_state, loop as trainer
from configs import default

flags.DEFINE_bool("smoke", False, "Shrink everything to run on CPU in seconds.")
flags.DEFINE_string("out", "", "Also write the JSON lines to this file.")
flags.DEFINE_string("models", "resnet18,deit_tiny", "Registered models to time.")
flags.DEFINE_string("dtype", "bfloat16", "config.model.dtype of every step.")
flags.DEFINE_integer("batch_size", 128, "Examples per step (per device for the 'devices' line).")
flags.DEFINE_integer("image_size", 224, "Image side.")
flags.DEFINE_integer("steps", 10, "Steps per timed run.")
flags.DEFINE_integer("repeats", 5, "Timed runs per step (interleaved; the median is reported).")
flags.DEFINE_integer("workers", 0, "Also time the input with this many grain workers (0: inline only).")
FLAGS = flags.FLAGS

NUM_CLASSES, NUM_GROUPS = 3, 6
# --smoke: the same code on CPU; the models keep every kind of layer.
SMOKE = dict(image_size=32, batch_size=8, steps=2, repeats=1)
SMOKE_KWARGS = {"resnet18": dict(width=8, stage_sizes=(1, 1)),
                "deit_tiny": dict(img_size=32, patch_size=8, dim=48, depth=1)}


@dataclasses.dataclass
class Run:
  """One jitted train step with its (donated, so replaced) state and batch."""
  step: object
  state: dict
  batch: dict
  examples: int
  compile_s: float


def settings() -> dict:
  s = dict(batch_size=FLAGS.batch_size, image_size=FLAGS.image_size, steps=FLAGS.steps,
           repeats=FLAGS.repeats)
  return dict(s, **SMOKE) if FLAGS.smoke else s


def make_config(model: str, data_devices: int):
  """The default config at this model and dtype, BAQ per channel, on `data_devices`."""
  config = default.get_config()
  config.model.name, config.model.dtype = model, FLAGS.dtype
  config.model.kwargs = SMOKE_KWARGS.get(model, {}) if FLAGS.smoke else {}
  config.quant.granularity = "channel"
  config.mesh.data = data_devices  # -1: all devices
  return config


def synthetic_batch(n: int, size: int) -> dict:
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(n, size, size, 3)).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, n).astype(np.int32),
          "group": rng.integers(0, NUM_GROUPS, n).astype(np.int32)}


def build_run(config, mode: str, size: int, per_device: int) -> Run:
  """The trainer's step of `mode` over `config.mesh`, compiled and run once."""
  mesh = sh.make_mesh(config)
  setup = train_state.create_train_state(
      config, mode, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS,
      image_shape=(size, size, 3), steps=1000, lr=1e-3)
  shardings = sh.state_shardings(mesh, setup.state, config, trainer.SHARDING_RULES)
  step, _ = trainer.jit_steps(config, setup, mesh, shardings, num_groups=NUM_GROUPS)
  n = per_device * mesh.shape["data"]
  run = Run(step, sh.put(setup.state, shardings),
            sh.shard_batch(synthetic_batch(n, size), mesh), n, 0.0)
  t = time.perf_counter()
  run.state, m = step(run.state, run.batch)
  jax.block_until_ready(m["loss"])
  run.compile_s = time.perf_counter() - t
  return run


def timed(runs: dict, steps: int, repeats: int) -> dict:
  """Median examples/s of each run, the runs interleaved within every repeat."""
  rates = {k: [] for k in runs}
  for _ in range(repeats):
    for k, r in runs.items():
      t = time.perf_counter()
      for _ in range(steps):
        r.state, m = r.step(r.state, r.batch)
      jax.block_until_ready(m["loss"])
      rates[k].append(r.examples * steps / (time.perf_counter() - t))
  return {k: float(np.median(v)) for k, v in rates.items()}


def input_rate(batch_size: int, size: int, steps: int, workers: int) -> float:
  """Images/s of the paper recipe's batches (Batcher over uint8 images in memory)."""
  n = max(4 * batch_size, 64)
  rng = np.random.default_rng(0)
  split = Split(rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8),
                np.zeros(n, np.int32), np.arange(n) % 4, 2, 4, ("a", "b"), tuple("wxyz"),
                "bench")
  # Grain workers hold 2 batches each ahead (pipeline.batches): those are
  # taken before the clock starts, so it times making batches, not a buffer.
  warm = 1 + 2 * workers
  stream = batches(Batcher(split, batch_size, augment=augment.PAPER_RECIPE), 0, warm + steps,
                   workers)
  for _ in range(warm):
    next(stream)
  t = time.perf_counter()
  for _ in range(steps):  # not to exhaustion: that would time the workers' shutdown
    next(stream)
  rate = steps * batch_size / (time.perf_counter() - t)
  stream.close()
  return rate


def emit(record: dict) -> None:
  line = json.dumps(record)
  print(line, flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "a") as f:
      f.write(line + "\n")


def log(msg: str, t0: float) -> None:
  print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)


def main(argv):
  del argv
  t0, s = time.perf_counter(), settings()
  if FLAGS.out:
    open(FLAGS.out, "w").close()
  dev = jax.devices()[0]
  emit(dict(kind="env", device_kind=dev.device_kind, platform=dev.platform,
            devices=jax.device_count(), jax=jax.__version__, dtype=FLAGS.dtype,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            smoke=FLAGS.smoke, **s))
  size, b = s["image_size"], s["batch_size"]
  step_rates, one = {}, {}
  for model in FLAGS.models.split(","):
    runs = {m: build_run(make_config(model, 1), m, size, b) for m in ("float", "baq")}
    log(f"{model}: compiled in {runs['float'].compile_s:.1f} s (float), "
        f"{runs['baq'].compile_s:.1f} s (baq)", t0)
    r = timed(runs, s["steps"], s["repeats"])
    emit(dict(kind="step", model=model, float_examples_per_s=r["float"],
              baq_examples_per_s=r["baq"], baq_over_float=r["baq"] / r["float"],
              compile_s={m: run.compile_s for m, run in runs.items()}))
    step_rates.update({f"{model}/{m}": v for m, v in r.items()})
    one[model] = runs["baq"]
  for workers in sorted({0, FLAGS.workers}):
    rate = input_rate(b, size, s["steps"], workers)
    emit(dict(kind="input", workers=workers, recipe="paper", images_per_s=rate,
              input_over_step={k: rate / v for k, v in step_rates.items()}))
    log(f"input, {workers} workers: {rate:.1f} images/s", t0)
  n = jax.device_count()
  if n == 1:
    emit(dict(kind="devices", model="resnet18", note="only one device exists"))
  else:
    runs = {1: one.get("resnet18") or build_run(make_config("resnet18", 1), "baq", size, b),
            n: build_run(make_config("resnet18", -1), "baq", size, b)}
    r = timed(runs, s["steps"], s["repeats"])
    emit(dict(kind="devices", model="resnet18", mode="baq", devices=n, per_device_batch=b,
              one_device_examples_per_s=r[1], all_devices_examples_per_s=r[n],
              all_over_one=r[n] / r[1], compile_s=runs[n].compile_s))
  log("done", t0)


if __name__ == "__main__":
  app.run(main)
