"""Where the main job's CPU train step goes: max pooling's gradient and the convolutions.

  python -m benchmarks.cpu_step [--batch_size=128] [--repeats=30]

Side by side in one process, jitted, median over `repeats` calls after
compilation, on SmallCNN's shapes at 32 px (baq/models/cnn.py):

  * the gradient of a 2x2 max pool of [B, 32, 32, 16] through `nn.max_pool`
    (XLA's select-and-scatter) and through `baq.models.layers.max_pool`
    (a reshape and a max, the same values and gradients), and their ratio;
  * each 3x3 convolution's forward, input-gradient and kernel-gradient pass;
  * the float train step of the default config (`make_train_step`), for
    scale.

glibc's allocator runs at its defaults, as in train.py.
"""

import time

from absl import app, flags



import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from baq.models.layers import max_pool  # noqa: E402
from baq.train import state as train_state  # noqa: E402
from baq.train.step import make_train_step  # noqa: E402
from configs import default  # noqa: E402

flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
flags.DEFINE_integer("repeats", 30, "Timed calls per measurement.")
FLAGS = flags.FLAGS


def _ms(fn, *args) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def _pools(rng, b):
  x = jnp.asarray(rng.normal(size=(b, 32, 32, 16)), jnp.float32)
  grad = lambda pool: jax.grad(lambda v: (pool(jax.nn.relu(v)) ** 2).sum())  # noqa: E731
  flax_ms = _ms(grad(lambda v: nn.max_pool(v, (2, 2), (2, 2))), x)
  ours_ms = _ms(grad(lambda v: max_pool(v, (2, 2), (2, 2))), x)
  print(f"max-pool gradient, {b}x32x32x16: nn.max_pool {flax_ms:.2f} ms, layers.max_pool "
        f"{ours_ms:.2f} ms ({flax_ms / ours_ms:.1f}x)")


def _convs(rng, b):
  conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  for side, cin, cout in ((32, 3, 16), (16, 16, 32), (8, 32, 64)):
    x = jnp.asarray(rng.normal(size=(b, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
    g = jnp.ones((b, side, side, cout), jnp.float32)
    fwd = _ms(conv, x, w)
    dx = _ms(lambda x, w, g: jax.vjp(lambda v: conv(v, w), x)[1](g), x, w, g)
    dw = _ms(lambda x, w, g: jax.vjp(lambda k: conv(x, k), w)[1](g), x, w, g)
    print(f"conv 3x3 {side}px {cin}->{cout}: forward {fwd:.2f} ms, input gradient {dx:.2f} ms, "
          f"kernel gradient {dw:.2f} ms")


def _step(rng, b):
  config = default.get_config().copy_and_resolve_references()
  batch = {"image": jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, b), jnp.int32),
           "group": jnp.asarray(rng.integers(0, 6, b), jnp.int32)}
  setup = train_state.create_train_state(config, "float", num_classes=3, num_groups=6,
                                         image_shape=(32, 32, 3), steps=1000, lr=1e-3)
  step = make_train_step(setup.model, setup.tx, setup.penalties, setup.layers, num_groups=6,
                         budget=setup.budget, bit_bounds=None)
  # The whole (state, metrics) comes back: asking for the loss alone would let
  # XLA drop the backward pass.
  print(f"float train step (default config, {b}x32x32x3): {_ms(step, setup.state, batch):.2f} ms")


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  print(f"device: {jax.devices()[0].platform}, {jax.device_count()} device(s)")
  _pools(rng, FLAGS.batch_size)
  _convs(rng, FLAGS.batch_size)
  _step(rng, FLAGS.batch_size)


if __name__ == "__main__":
  app.run(main)
