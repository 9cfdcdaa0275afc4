r"""GPTQ's time per layer against layer width, and its ratio to round-to-nearest.

  python -m benchmarks.gptq [--widths=128,256,512,1024,2048] [--bits=4]

On a CPU shared with other jobs, prefix XLA_FLAGS=--xla_cpu_multi_thread_eigen=false:
XLA's worker threads spin while they wait for a descheduled sibling, and the
same GPTQ call then takes 20 ms or 500 ms by turns (CPU time included).

Square Dense kernels d x d (calibration rows X [2d, d], H = 2 X^T X / n) go
through `gptq.gptq` and `gptq.rtn` directly: `hessian` is forming X^T X,
`gptq` the algorithm on a ready Hessian, `rtn` round-to-nearest on the same
grid, each the fastest of --repeats warm calls (compilation is timed apart,
in `compile`: the first call at a new shape bucket). Wall time and process
CPU time (all threads) are both shown, each the minimum over the calls: on a
shared CPU the same call's wall time varies tenfold with the other jobs'
load (GPTQ's column loop is many small dependent ops, which wait whenever
the process is descheduled), while CPU time counts only what the call used. The conv row runs a 3x3
Conv (C -> C on 32x32 maps, batch --conv_batch) through
`gptq_model.quantize_model`, which adds capturing the layer's input and its
patches' Gram matrix; its ratio is that of the whole per-layer call with
method "gptq" to method "rtn" (which still forms the Gram matrix, for the
error record). Prints one table.
"""

import os
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from baq.quant import gptq, hessian
from baq.ptq import sequential as gptq_model

flags.DEFINE_list("widths", ["128", "256", "512", "1024", "2048"], "Dense widths d (d x d).")
flags.DEFINE_integer("bits", 4, "Bit-width.")
flags.DEFINE_integer("repeats", 7, "Warm calls per measurement (the fastest is kept).")
flags.DEFINE_integer("conv_channels", 64, "Channels of the conv layer.")
flags.DEFINE_integer("conv_batch", 64, "Calibration images of the conv layer.")
FLAGS = flags.FLAGS


def timed(fn, repeats: int) -> tuple[float, float, float]:
  """(first call's wall time, then the least wall and CPU time of `repeats` calls), s."""
  t = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t
  wall, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  return first, float(np.min(wall)), float(np.min(cpu))


def dense_row(d: int, bits: int, repeats: int) -> dict:
  rng = np.random.default_rng(d)
  x = (rng.normal(size=(2 * d, d)) * rng.lognormal(0, 0.5, d)).astype(np.float32)
  w = (rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32)
  stats = jax.jit(lambda x: hessian.update_stats(hessian.init_stats(d), x).xtx)
  _, t_h, c_h = timed(lambda: stats(x), repeats)
  h = hessian.hessian(hessian.HessianStats(stats(x), 2 * d))
  first, t_g, c_g = timed(lambda: gptq.gptq(w, h, bits).weight, repeats)
  _, t_r, c_r = timed(lambda: gptq.rtn(w, bits), repeats)
  return dict(layer=f"dense {d}x{d}", d_in=d, d_out=d, hessian=(t_h, c_h), gptq=(t_g, c_g),
              rtn=(t_r, c_r), compile=first - t_g)


class _Conv(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.channels, (3, 3))(x)


def conv_row(c: int, batch: int, bits: int, repeats: int) -> dict:
  model = _Conv(c)
  x = np.random.default_rng(0).normal(size=(batch, 32, 32, c)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(x[:1]))
  run = lambda method: gptq_model.quantize_model(model, variables, x, bits=bits, method=method,
                                         batch_size=batch)[0]
  first, t_g, c_g = timed(lambda: run("gptq"), repeats)
  _, t_r, c_r = timed(lambda: run("rtn"), repeats)
  return dict(layer=f"conv 3x3 {c}->{c}, {batch}x32x32", d_in=9 * c, d_out=c,
              hessian=(np.nan, np.nan), gptq=(t_g, c_g), rtn=(t_r, c_r), compile=first - t_g)


def main(argv):
  del argv
  rows = [dense_row(int(d), FLAGS.bits, FLAGS.repeats) for d in FLAGS.widths]
  rows.append(conv_row(FLAGS.conv_channels, FLAGS.conv_batch, FLAGS.bits, FLAGS.repeats))
  print(f"GPTQ vs round-to-nearest, {FLAGS.bits} bits, per-channel grid, "
        f"{jax.devices()[0].platform} ({os.cpu_count()} cores); ms of wall / CPU time, "
        f"least of {FLAGS.repeats} calls")
  print(f"{'layer':28s} {'d_in':>5s} {'d_out':>5s} {'hessian':>15s} {'gptq':>17s} "
        f"{'rtn':>15s} {'gptq/rtn':>11s} {'compile_s':>9s}")
  pair = lambda t, w: f"{1e3 * t[0]:{w}.1f}/{1e3 * t[1]:<{w}.1f}"
  for r in rows:
    ratio = f"{r['gptq'][0] / r['rtn'][0]:5.1f}/{r['gptq'][1] / max(r['rtn'][1], 1e-9):<5.1f}"
    print(f"{r['layer']:28s} {r['d_in']:5d} {r['d_out']:5d} {pair(r['hessian'], 7)} "
          f"{pair(r['gptq'], 8)} {pair(r['rtn'], 7)} {ratio:>11s} {r['compile']:9.2f}")
  print("dense: gptq on a ready Hessian, rtn alone; conv: the whole quantize_model call "
        "(input capture, patch Gram, then gptq or rtn)")


if __name__ == "__main__":
  app.run(main)
