"""Deployment figures: ONNX file size and onnxruntime CPU latency, float against quantized.

  python -m benchmarks.export [--models=small_cnn,resnet18,deit_tiny] [--repeats=5]

For each model (random weights: size and speed do not depend on training),
the graphs of `baq.export.onnx` for: float, uniform 8-bit, uniform 4-bit and
a mixed allocation (random per-layer bits projected onto 4.0 average bits),
weights only, per-channel mse scales. Each is run by onnxruntime on the same
inputs in this process, at batch 1 and 64, median of `repeats` calls after a
warm-up, in each `session` mode: exact (MatMulNBits in float32, what the
parity tests use), fold (weights dequantized once at load) and default
(onnxruntime's: int8 activations inside MatMulNBits). Printed: the ONNX
file's size and ratio to float, the packed safetensors file's size (codes at
their exact bits), milliseconds and speed-up over the float graph (ratios
measured side by side) and the largest logit difference from baq's model
on 8 of the inputs.
"""

import os
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from baq.allocation import projection
from baq.export import onnx as onnx_export
from baq.export import packed
from baq.export.onnx import graph, ops
from baq.models import build_model, size_options
from baq.quant import QuantMode, QuantSpec, Quantizer, units
from baq.variables import apply_model

flags.DEFINE_string("models", "small_cnn,resnet18,deit_tiny", "Registered model names.")
flags.DEFINE_integer("repeats", 5, "Timed calls per setting.")
flags.DEFINE_integer("threads", 0, "onnxruntime intra-op threads (0: its default).")
FLAGS = flags.FLAGS
_SIZES = {"small_cnn": 32}


def _file_bytes(write) -> int:
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "f")
    write(path)
    return os.path.getsize(path)


def _graph(name, size, allocation):
  """(ONNX model, its file bytes, packed safetensors bytes, baq's logits of a batch)
  of `name` at an allocation: None (float), a bit-width or "mixed"."""
  spec = QuantSpec(init_bits=4.0, granularity="channel", scale_method="mse")
  model = build_model(name, 10, Quantizer(((".*", spec),)), **size_options(name, size))
  x = jnp.zeros((1, size, size, 3))
  v = dict(model.init({"params": jax.random.key(0), "quant": jax.random.key(1)}, x))
  layers = units.find_units(v["params"])
  n = len(units.gather_bits(v["params"], layers))
  if allocation is None:  # the float model, same weights, through the same converter
    fmodel = build_model(name, 10, None, **size_options(name, size))
    fvars = dict(v, params=packed.dequantized_params(v["params"], {}))
    m = graph.trace_to_onnx(lambda x, p: apply_model(fmodel, p, x),
                            jax.ShapeDtypeStruct(x.shape, jnp.float32),
                            jax.tree_util.tree_map(np.asarray, fvars), ops.HANDLERS, {})
    packed_bytes, logits = None, lambda xb: apply_model(fmodel, fvars, xb)
  else:
    bits = (np.full(n, float(allocation)) if allocation != "mixed" else
            np.random.default_rng(0).uniform(2, 8, n))
    params = units.scatter_bits(v["params"], layers, jnp.asarray(bits, jnp.float32))
    target = 4.0 if allocation == "mixed" else float(allocation)
    _, deployed = projection.deploy(params, layers, target, 2, 8)
    dv = dict(v, params=deployed)
    captured = packed.capture_codes(model, dv, x)
    m = onnx_export.to_onnx(model, dv, captured, x)
    packed_bytes = _file_bytes(lambda p: packed.save_packed(p, captured, True))
    eval_model = model.clone(quant=model.quant.replace(mode=QuantMode.EVAL))
    logits = lambda xb: apply_model(eval_model, dv, xb)  # noqa: E731
  nbytes = _file_bytes(lambda p: open(p, "wb").write(m.SerializeToString()))
  return m, nbytes, packed_bytes, logits


def _latency_ms(sess, x, repeats):
  name = sess.get_inputs()[0].name
  sess.run(None, {name: x})
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    sess.run(None, {name: x})
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def main(argv):
  del argv
  modes = onnx_export.SESSION_MODES
  print(f"{'model':10s} {'graph':8s} {'ONNX MB':>8s} {'ratio':>6s} {'packed MB':>9s} "
        f"{'mode':8s} {'batch 1 ms':>16s} {'batch 64 ms':>16s} {'max|dlogit|':>11s}")
  for name in FLAGS.models.split(","):
    size = _SIZES.get(name, 224)
    xs = {b: np.random.default_rng(b).normal(size=(b, size, size, 3)).astype(np.float32)
          for b in (1, 64)}
    base_ms, base_bytes = {}, None
    for alloc in (None, 8, 4, "mixed"):
      label = {None: "float", 8: "uniform8", 4: "uniform4", "mixed": "mixed4"}[alloc]
      m, nbytes, packed_bytes, logits = _graph(name, size, alloc)
      want = np.asarray(logits(jnp.asarray(xs[64][:8])))
      base_bytes = base_bytes or nbytes
      for mode in (modes[:1] if alloc is None else modes):
        sess = onnx_export.session(m, mode=mode, threads=FLAGS.threads or None)
        cells = []
        for b in (1, 64):
          ms = _latency_ms(sess, xs[b], FLAGS.repeats)
          base_ms.setdefault(b, ms)
          cells.append(f"{ms:8.2f} ({base_ms[b] / ms:4.2f}x)")
        diff = np.max(np.abs(onnx_export.run(sess, xs[64][:8]) - want))
        pk = "-" if packed_bytes is None else f"{packed_bytes / 1e6:9.3f}"
        print(f"{name:10s} {label:8s} {nbytes / 1e6:8.3f} {nbytes / base_bytes:6.3f} {pk:>9s} "
              f"{mode:8s} " + " ".join(f"{c:>16s}" for c in cells) + f" {diff:11.2e}",
              flush=True)


if __name__ == "__main__":
  app.run(main)
