"""BAQ train-step time over float train-step time, same model and batch.

  python -m benchmarks.train_step [--batch_size=128] [--image_size=32] [--model=small_cnn]
      [--granularity=layer|channel] [--parametrization=diffq] [--scale_method=mse]

Both steps are the trainer's own: `state.create_train_state` and
`step.make_train_step` with the default config's optimizer and penalties,
timed side by side in one process after compilation (median over repeats of
interleaved runs). Target on CPU: ratio <= 1.2.
"""

import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from baq.train import state as train_state
from baq.train.step import make_train_step
from configs import default

flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("image_size", 32, "Image side.")
flags.DEFINE_string("model", "small_cnn", "Registered model.")
flags.DEFINE_string("model_kwargs", "", 'Model options as JSON, e.g. \'{"stem_stride": 2}\'.')
flags.DEFINE_string("parametrization", None, "BAQ parametrization (default: the config's).")
flags.DEFINE_string("granularity", None, "Bit units, layer or channel (default: the config's).")
flags.DEFINE_string("scale_method", None, "Scale method (default: the config's).")
flags.DEFINE_integer("steps", 20, "Steps per timed run.")
flags.DEFINE_integer("repeats", 7, "Timed runs per mode.")
FLAGS = flags.FLAGS


def _hashable(v):
  """JSON lists as tuples: model options are static (hashed) jit arguments."""
  return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def build_step(config, mode, batch):
  config = config.copy_and_resolve_references()
  if FLAGS.model != config.model.name:
    config.model.name, config.model.kwargs = FLAGS.model, {}
  for k, v in json.loads(FLAGS.model_kwargs or "{}").items():
    config.model.kwargs[k] = _hashable(v)
  setup = train_state.create_train_state(
      config, mode, num_classes=3, num_groups=6, image_shape=batch["image"].shape[1:],
      steps=1000, lr=1e-3)
  step = jax.jit(make_train_step(setup.model, setup.tx, setup.penalties, setup.layers,
                                 num_groups=6, budget=setup.budget,
                                 bit_bounds=(config.quant.min_bits, config.quant.max_bits)),
                 donate_argnums=0)
  state, m = step(setup.state, batch)  # compile
  jax.block_until_ready(m["loss"])
  return step, state


def time_run(step, state, batch, n):
  t = time.perf_counter()
  for _ in range(n):
    state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  return state, (time.perf_counter() - t) / n


def main(argv):
  del argv
  config = default.get_config()
  config.quant.parametrization = FLAGS.parametrization or config.quant.parametrization
  config.quant.granularity = FLAGS.granularity or config.quant.granularity
  config.quant.scale_method = FLAGS.scale_method or config.quant.scale_method
  rng = np.random.default_rng(0)
  s, b = FLAGS.image_size, FLAGS.batch_size
  batch = {"image": jnp.asarray(rng.normal(size=(b, s, s, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, b), jnp.int32),
           "group": jnp.asarray(rng.integers(0, 6, b), jnp.int32)}
  runs = {m: build_step(config, m, batch) for m in ("float", "baq")}
  times = {m: [] for m in runs}
  for _ in range(FLAGS.repeats):
    for m, (step, state) in runs.items():
      state, t = time_run(step, state, batch, FLAGS.steps)
      runs[m] = (step, state)
      times[m].append(t)
  med = {m: float(np.median(t)) for m, t in times.items()}
  print(f"device: {jax.devices()[0].platform}, model {FLAGS.model}, batch {b}x{s}x{s}x3, "
        f"{config.quant.parametrization}, per {config.quant.granularity}, "
        f"{config.quant.scale_method} scales")
  for m, t in med.items():
    print(f"  {m:5s} train step: {1e3 * t:8.2f} ms")
  print(f"BAQ/float step-time ratio: {med['baq'] / med['float']:.3f} (target <= 1.2)")


if __name__ == "__main__":
  app.run(main)
