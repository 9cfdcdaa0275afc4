"""BAQ train-step time over float train-step time, same model and batch.

  python benchmarks/train_step.py [--batch_size=128] [--image_size=32] [--model=small_cnn]

Both steps are the trainer's own jitted update (`baq.train.trainer.make_train_step`)
with the default config's optimizer and penalties, timed side by side in one
process after compilation (median over repeats of interleaved runs).
Target on CPU: ratio <= 1.2.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from baq.train import trainer
from baq.models import build_model
from baq.train.modes import get_mode
from baq.quant import units as U
from configs import default

flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("image_size", 32, "Image side.")
flags.DEFINE_string("model", "small_cnn", "Registered model.")
flags.DEFINE_string("model_kwargs", "", 'Model options as JSON, e.g. \'{"stem_stride": 2}\'.')
flags.DEFINE_string("parametrization", "fracbits", "BAQ parametrization.")
flags.DEFINE_integer("steps", 20, "Steps per timed run.")
flags.DEFINE_integer("repeats", 7, "Timed runs per mode.")
FLAGS = flags.FLAGS


def build_step(config, mode, batch):
  spec = get_mode(config, mode)
  kwargs = config.model.kwargs.to_dict() if FLAGS.model == config.model.name else {}
  kwargs.update(json.loads(FLAGS.model_kwargs or "{}"))
  model = build_model(FLAGS.model, 3, spec.quantizer, **kwargs)
  variables = trainer.model_variables(model, jax.random.key(0), batch["image"][:1])
  params = variables["params"]
  layers = U.find_units(params)
  tx = trainer.make_optimizer(config, params, lr=1e-3, steps=1000, train_bits=spec.train_bits)
  pens = trainer.build_penalties(config, spec.train_bits)
  target = trainer.target_bits(config, params, layers) if spec.uses_budget else float("nan")
  step = jax.jit(trainer.make_train_step(model, tx, pens, layers, num_groups=6,
                                         target_bits=target, bit_bounds=(2, 8)),
                 donate_argnums=0)
  # The trainer's own state: a state without batch_stats would compile twice.
  state = trainer.init_state(params, variables.get("batch_stats", {}), tx, pens, 6,
                             jax.random.key(1))
  state, m = step(state, batch)  # compile
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
  config.quant.parametrization = FLAGS.parametrization
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
        f"{FLAGS.parametrization}")
  for m, t in med.items():
    print(f"  {m:5s} train step: {1e3 * t:8.2f} ms")
  print(f"BAQ/float step-time ratio: {med['baq'] / med['float']:.3f} (target <= 1.2)")


if __name__ == "__main__":
  app.run(main)
