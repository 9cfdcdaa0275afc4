"""A deployed baq model as an ONNX graph, and onnxruntime to run it.

The graph is the float model with every quantized kernel replaced by its
integer codes behind a DequantizeLinear node (per-tensor or per-channel
scale and zero point, the layer's own bit-width), and, when the model
quantizes activations, a QuantizeLinear / DequantizeLinear pair on each
quantized layer's input whose scale is computed per example at run time,
as baq's dynamic abs-max does. Codes are stored in the narrowest ONNX
integer type that holds them and their zero point: int4 / uint4 for up to
4 bits, else int8 / uint8 (a 5-7 bit code is stored in 8 bits with its true
range; the allocation in the metadata says how many bits it has).

What onnxruntime does with it on CPU (`session` modes; measured in
benchmarks/export.py): a weight DequantizeLinear feeding a MatMul (Dense
layers, attention projections) becomes its MatMulNBits kernel, which keeps
the weights packed; one feeding a convolution is run at every call (or,
mode "fold", once at load), and the convolution is a float kernel: for
convolutions the bits are storage only. The activation pairs run at every
call, with no integer kernels, because their scales are computed per
example.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import TensorProto

from baq.export import packed
from baq.export.onnx import graph, ops
from baq.variables import apply_model

# Narrowest first; a type is used if it holds every code and the zero point.
_CODE_TYPES = ((TensorProto.INT4, -8, 7), (TensorProto.UINT4, 0, 15),
               (TensorProto.INT8, -128, 127), (TensorProto.UINT8, 0, 255),
               (TensorProto.INT16, -2**15, 2**15 - 1), (TensorProto.UINT16, 0, 2**16 - 1))


@jax.jit
def baq_dequantize_linear(codes, scale, zero_point):
  """The kernel of integer codes, `(codes - zero_point) * scale`; a named call
  that the exporter writes as DequantizeLinear."""
  return (codes - zero_point) * scale


def code_type(codes: np.ndarray, zero_point: np.ndarray, int4: bool = True) -> int:
  """The ONNX element type that stores `codes` and `zero_point` exactly."""
  lo = min(float(np.min(codes)), float(np.min(zero_point)))
  hi = max(float(np.max(codes)), float(np.max(zero_point)))
  for t, tmin, tmax in _CODE_TYPES:
    if (int4 or t not in (TensorProto.INT4, TensorProto.UINT4)) and tmin <= lo and hi <= tmax:
      return t
  raise ValueError(f"Codes in [{lo}, {hi}] fit no ONNX integer type up to 16 bits.")


def _per_axis(scale: np.ndarray) -> Optional[int]:
  wide = [i for i, s in enumerate(np.shape(scale)) if s != 1]
  if len(wide) > 1:
    raise NotImplementedError(f"ONNX export: a scale of shape {np.shape(scale)} varies "
                              "along more than one axis.")
  return wide[0] if wide else None


def _dequantize_handler(int4: bool):
  def h(g: graph.Graph, eqn, ins):
    codes, scale, zp = (np.asarray(v) for v in ins)
    name = getattr(ins[0], "export_name", "codes/w/0").split("/", 1)[-1].rsplit("/", 1)[0]
    return [graph.Dequantized(codes, scale, np.broadcast_to(zp, scale.shape), _per_axis(scale),
                              code_type(codes, zp, int4), name)]
  return h


def _activation_handler(symmetric: bool, int4: bool):
  """QuantizeLinear / DequantizeLinear with baq's per-example abs-max scale."""
  def h(g: graph.Graph, eqn, ins):
    x, bits = g.tensor(ins[0]), int(np.asarray(ins[1]))
    dtype = eqn.invars[0].aval.dtype
    c = lambda v: g.const(np.asarray(v, dtype))  # noqa: E731
    axes = g.const(np.arange(1, len(eqn.invars[0].aval.shape), dtype=np.int64), "axes")
    hi = g.op("ReduceMax", [x, axes], keepdims=0)
    lo = g.op("ReduceMin", [x, axes], keepdims=0)
    if symmetric:  # as fake_quant: r = max(|max|, |min|), scale = max(r, eps) / qmax
      r = g.op("Max", [g.op("Abs", [hi]), g.op("Abs", [lo])])
      scale = g.op("Div", [g.op("Max", [r, c(1e-8)]), c(2.0 ** (bits - 1) - 1)])
      t = TensorProto.INT4 if (bits <= 4 and int4) else TensorProto.INT8
      q = g.op("QuantizeLinear", [x, scale], axis=0, output_dtype=t)
      return [g.op("DequantizeLinear", [q, scale], axis=0)]
    lo = g.op("Min", [lo, c(0.0)])
    hi = g.op("Max", [hi, c(0.0)])
    scale = g.op("Div", [g.op("Max", [g.op("Sub", [hi, lo]), c(1e-8)]), c(2.0 ** bits - 1)])
    t = TensorProto.UINT4 if (bits <= 4 and int4) else TensorProto.UINT8
    zp = g.op("Cast", [g.op("Round", [g.op("Div", [g.op("Neg", [lo]), scale])])], to=t)
    q = g.op("QuantizeLinear", [x, scale, zp], axis=0)
    return [g.op("DequantizeLinear", [q, scale, zp], axis=0)]
  return h


def _marked(int4: bool) -> dict:
  return {"baq_dequantize_linear": _dequantize_handler(int4),
          "baq_act_qdq_symmetric": _activation_handler(True, int4),
          "baq_act_qdq_asymmetric": _activation_handler(False, int4)}


def to_onnx(model, variables: dict, captured: dict[str, dict], example: Any, *,
            normalize: Optional[tuple[Any, Any]] = None, dynamic_batch: bool = True,
            int4: bool = True, metadata: Optional[dict[str, Any]] = None) -> onnx.ModelProto:
  """The ONNX graph of a deployed quantized model.

  Args:
    model: the quantized model (any mode; it is run as `reference_model`).
    variables: its deployed variables ({"params", "batch_stats"?}).
    captured: `packed.capture_codes` of the model: each quantized layer's
      integer codes, scale and zero point.
    example: an input batch (its shape; batch axis first).
    normalize: (mean, std) per channel, uint8 scale: the graph then takes
      uint8 images and normalizes them as baq's input pipeline does;
      without it the graph takes the model's float input.
    dynamic_batch: the batch axis is symbolic ("N") instead of fixed.
    int4: store codes of up to 4 bits as int4 / uint4 (else in 8 bits).
    metadata: written, as JSON strings, into the model's metadata_props.
  """
  ref = packed.reference_model(model)
  fvars = dict(variables, params=packed.dequantized_params(variables["params"], {}))
  codes = {layer: tuple(np.asarray(rec[k], np.float32) for k in ("codes", "scale", "zero_point"))
           for layer, rec in captured.items()}

  def forward(x, tree):
    if normalize is not None:
      x = (x.astype(jnp.float32) - np.asarray(normalize[0], np.float32)) / np.asarray(
          normalize[1], np.float32)
    flat = jax.tree_util.tree_map(lambda a: a, tree["vars"])
    for layer, (q, s, z) in tree["codes"].items():
      node = flat["params"]
      for part in layer.split("/"):
        node = node[part]
      node["kernel"] = baq_dequantize_linear(q, s, z)
    return apply_model(ref, flat, x)

  tree = {"vars": jax.tree_util.tree_map(np.asarray, _plain(fvars)), "codes": codes}
  props = {"baq.format": "baq.onnx", "baq.bits": json.dumps(
      {layer: np.asarray(rec["bits"]).astype(int).ravel().tolist()
       for layer, rec in captured.items()})}
  props.update({f"baq.{k}": json.dumps(v) for k, v in (metadata or {}).items()})
  if normalize is not None:
    props["baq.input"] = json.dumps({"dtype": "uint8", "layout": "NHWC", "mean": np.asarray(
        normalize[0]).tolist(), "std": np.asarray(normalize[1]).tolist()})
  ex = jax.ShapeDtypeStruct(np.shape(example), jnp.uint8 if normalize is not None
                            else jnp.float32)
  return graph.trace_to_onnx(forward, ex, tree, ops.HANDLERS, _marked(int4),
                             dynamic_batch=dynamic_batch, metadata=props)


def _plain(tree):
  """Nested dicts (FrozenDicts too) as plain dicts, so the export can edit them."""
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


SESSION_MODES = ("exact", "fold", "default")


def session(model_or_path, *, mode: str = "exact", threads: Optional[int] = None):
  """An onnxruntime CPU InferenceSession of an ONNX model or file.

  Modes (onnxruntime's treatment of the weight DequantizeLinear nodes):
    exact: a DequantizeLinear feeding a MatMul becomes the MatMulNBits
      kernel (weights stay packed) computing in float32 (accuracy level 1),
      so the logits match baq's; one feeding a convolution runs at every
      call.
    fold: QDQ handling off: every weight is dequantized once when the
      session starts (float speed, float memory; logits match baq's).
    default: onnxruntime's defaults: MatMulNBits quantizes the activations
      to int8 inside the product (accuracy level 4): fastest for Dense
      layers, but not the deployed model's arithmetic.
  """
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  if mode not in SESSION_MODES:
    raise ValueError(f"Unknown session mode {mode!r}. Valid: {', '.join(SESSION_MODES)}.")
  opts = ort.SessionOptions()
  if mode == "exact":
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
  elif mode == "fold":
    opts.add_session_config_entry("session.disable_quant_qdq", "1")
  if threads:
    opts.intra_op_num_threads = threads
  src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) \
      else model_or_path
  return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(sess, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
  """Logits of `images` (uint8 or float, as the graph takes) from an
  onnxruntime session, in batches."""
  inp = sess.get_inputs()[0]
  dtype = np.uint8 if inp.type == "tensor(uint8)" else np.float32
  out = [sess.run(None, {inp.name: np.asarray(images[i:i + batch_size], dtype)})[0]
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out, axis=0)
