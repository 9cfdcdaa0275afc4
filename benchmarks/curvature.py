"""Curvature speed on the default model, measured side by side in one process.

  python -m benchmarks.curvature [--batch=128] [--repeats=10]

The default SmallCNN (32x32 inputs, widths 16/32/64, 6 groups) at its
trained-from-scratch initialisation, one batch. Prints median times and:

  hvp / grad            one Hessian-vector product against one gradient
                        (target <= 2.5)
  group traces          every group's Hutchinson trace from forward-over-forward
                        probes (`curvature.group_traces`, all groups in one
                        pass) against the same estimate looped group by group
                        (target >= 1.5x faster)
  hutchinson diagonal   per-channel Hessian diagonals of all groups
                        (`curvature.hutchinson`, what the planner's per-channel
                        importance uses): the Python loop of jitted
                        single-group HVPs (batch_groups=False, the CPU path)
                        against the batched, scanned version, same probes
                        (target on CPU: loop >= 1.5x faster)
  group HVPs            H_g v for all 6 groups by a loop of single-group HVPs;
                        with --batched_hvp also `curvature.group_hvp` (the
                        groups' reverse passes vmapped), which on CPU turns
                        into batched convolutions that XLA runs very slowly
"""

import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from baq.allocation import curvature
from baq.fairness import losses
from baq.models import build_model

flags.DEFINE_integer("batch", 128, "Examples in the batch.")
flags.DEFINE_integer("repeats", 10, "Timed calls per variant (median).")
flags.DEFINE_integer("probes", 16, "Hutchinson probes of the trace comparison.")
flags.DEFINE_integer("diag_probes", 4, "Probes of the Hutchinson diagonal comparison "
                     "(timed once each: the batched version takes minutes on CPU).")
flags.DEFINE_bool("batched_hvp", False, "Also time group_hvp (jvp of a vmapped jacrev); "
                  "on CPU its batched convolutions are very slow.")
FLAGS = flags.FLAGS
G = 6


def _time(fn, *args, repeats=None):
  jax.block_until_ready(fn(*args))  # compile
  out = []
  for _ in range(repeats or FLAGS.repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t)
  return float(np.median(out))


def main(argv):
  del argv
  model = build_model("small_cnn", 3, None, widths=(16, 32, 64), hidden=64)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(FLAGS.batch, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, FLAGS.batch))
  g = jnp.asarray(np.arange(FLAGS.batch) % G)
  params = model.init(jax.random.key(0), x[:1])["params"]
  v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
  batch = {"image": x, "label": y, "group": g}

  def per_example(p):
    return losses.cross_entropy(model.apply({"params": p}, x), y)

  loss = lambda p: jnp.mean(per_example(p))
  group_loss = curvature.group_loss_fn(lambda p, im: model.apply({"params": p}, im), batch, G)
  say = lambda *a: print(*a, flush=True)
  say(f"SmallCNN 32x32, batch {FLAGS.batch}, {G} groups, median of {FLAGS.repeats} "
      f"on {jax.devices()[0].platform}:")
  t_grad = _time(jax.jit(jax.grad(loss)), params)
  say(f"  grad                      {1e3 * t_grad:8.2f} ms")
  t_hvp = _time(jax.jit(lambda p, v: curvature.hvp(loss, p, v)), params, v)
  say(f"  hvp                       {1e3 * t_hvp:8.2f} ms   hvp/grad = {t_hvp / t_grad:.2f} "
      "(target <= 2.5)")

  key = jax.random.key(2)
  kw = dict(num_probes=FLAGS.probes, probe_chunk=FLAGS.probes)
  traces = jax.jit(lambda p: curvature.group_traces(per_example, p, g, G, key, **kw).trace)
  one_group = jax.jit(lambda p, k: curvature.group_traces(
      per_example, p, g, G, key, mask=(g == k).astype(jnp.float32), **kw).trace[k])
  t_tr = _time(traces, params)
  say(f"  group traces, batched     {1e3 * t_tr:8.2f} ms   ({FLAGS.probes} probes, "
      "forward-over-forward, all groups in one pass)")
  t_loop_tr = _time(lambda p: [one_group(p, k) for k in range(G)], params)
  say(f"  group traces, loop of {G}   {1e3 * t_loop_tr:8.2f} ms   "
      f"batched is {t_loop_tr / t_tr:.2f}x faster (target >= 1.5)")

  def group_sum(p, b):
    per_ex = losses.cross_entropy(model.apply({"params": p}, b["image"]), b["label"])
    return jax.ops.segment_sum(per_ex, b["group"], G)

  kw = dict(num_probes=FLAGS.diag_probes, probe_chunk=FLAGS.diag_probes, args=(batch,))
  diag_batched = jax.jit(lambda p: curvature.hutchinson(group_sum, p, key, **kw).diagonal)
  t_db = _time(diag_batched, params, repeats=1)
  t_dh = _time(lambda p: curvature.hutchinson(group_sum, p, key, batch_groups=False, **kw).diagonal,
               params, repeats=1)
  say(f"  hutchinson diag, batched  {1e3 * t_db:8.2f} ms   ({FLAGS.diag_probes} probes, "
      f"{G} groups)")
  say(f"  hutchinson diag, loop     {1e3 * t_dh:8.2f} ms   loop is {t_db / t_dh:.2f}x faster "
      "(target on CPU >= 1.5)")

  single = jax.jit(lambda p, v, k: curvature.hvp(lambda q: group_loss(q)[k], p, v))
  t_loop_hvp = _time(lambda p, v: [single(p, v, k) for k in range(G)], params, v)
  say(f"  group HVPs, loop of {G}     {1e3 * t_loop_hvp:8.2f} ms")
  if FLAGS.batched_hvp:
    t_ghvp = _time(jax.jit(lambda p, v: curvature.group_hvp(group_loss, p, v)), params, v)
    say(f"  group HVPs, batched       {1e3 * t_ghvp:8.2f} ms   "
        f"batched is {t_loop_hvp / t_ghvp:.2f}x faster")


if __name__ == "__main__":
  app.run(main)
