"""ONNX nodes for the JAX primitives of baq's models (inference graphs).

Each handler takes (graph, equation, input values) and returns the output
values. Layouts: JAX convolutions and pools run channels-last here, ONNX's
channels-first, so those handlers transpose in and out (onnxruntime's
layout optimizer removes the pairs between consecutive convolutions).
"""

from __future__ import annotations

import string
from typing import Any

import numpy as np
from onnx import helper

from baq.export.onnx.graph import Dequantized, Graph


def _t(g: Graph, eqn, ins, i: int) -> str:
  """Input i as a tensor name; a constant takes its jaxpr dtype."""
  v = ins[i]
  if isinstance(v, (str, Dequantized)):
    return g.tensor(v)
  return g.const(np.asarray(v, eqn.invars[i].aval.dtype))


def _out_shape(eqn, k: int = 0):
  return tuple(eqn.outvars[k].aval.shape)


def _binary(op):
  return lambda g, eqn, ins: [g.op(op, [_t(g, eqn, ins, 0), _t(g, eqn, ins, 1)])]


def _unary(op):
  return lambda g, eqn, ins: [g.op(op, [_t(g, eqn, ins, 0)])]


def _identity(g, eqn, ins):
  return [ins[0]]


def _ne(g, eqn, ins):
  return [g.op("Not", [g.op("Equal", [_t(g, eqn, ins, 0), _t(g, eqn, ins, 1)])])]


def _rsqrt(g, eqn, ins):
  return [g.op("Reciprocal", [g.op("Sqrt", [_t(g, eqn, ins, 0)])])]


def _erfc(g, eqn, ins):
  one = g.const(np.asarray(1.0, eqn.invars[0].aval.dtype))
  return [g.op("Sub", [one, g.op("Erf", [_t(g, eqn, ins, 0)])])]


def _shifted(op, shift, after):
  """op(x + shift) + after: log1p, expm1."""
  def h(g, eqn, ins):
    c = lambda v: g.const(np.asarray(v, eqn.invars[0].aval.dtype))  # noqa: E731
    y = g.op(op, [g.op("Add", [_t(g, eqn, ins, 0), c(shift)])] if shift else [_t(g, eqn, ins, 0)])
    return [g.op("Add", [y, c(after)]) if after else y]
  return h


def _square(g, eqn, ins):
  x = _t(g, eqn, ins, 0)
  return [g.op("Mul", [x, x])]


def _integer_pow(g, eqn, ins):
  y = g.const(np.asarray(eqn.params["y"], eqn.invars[0].aval.dtype))
  return [g.op("Pow", [_t(g, eqn, ins, 0), y])]


def _round(g, eqn, ins):
  x = _t(g, eqn, ins, 0)
  if int(eqn.params["rounding_method"]) == 1:  # to nearest even: ONNX's Round
    return [g.op("Round", [x])]
  half = g.const(np.asarray(0.5, eqn.invars[0].aval.dtype))
  mag = g.op("Floor", [g.op("Add", [g.op("Abs", [x]), half])])
  return [g.op("Mul", [g.op("Sign", [x]), mag])]


def _convert(g, eqn, ins):
  to = helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params["new_dtype"]))
  return [g.op("Cast", [_t(g, eqn, ins, 0)], to=to)]


def _reshape(g, eqn, ins):
  shape = g.shape_tensor(_out_shape(eqn), allow_infer=True)
  return [g.op("Reshape", [_t(g, eqn, ins, 0), shape])]


def _broadcast_in_dim(g, eqn, ins):
  shape, dims = _out_shape(eqn), eqn.params["broadcast_dimensions"]
  in_shape = tuple(eqn.invars[0].aval.shape)
  x = _t(g, eqn, ins, 0)
  expanded = [1] * len(shape)
  for d, s in zip(dims, in_shape):
    expanded[d] = s
  if tuple(expanded) != in_shape:
    x = g.op("Reshape", [x, g.shape_tensor(expanded, allow_infer=True)])
  if tuple(expanded) == shape:
    return [x]
  # Expand broadcasts: a dimension the input already has can be given as 1.
  target = [1 if (e == s and not isinstance(s, int)) else s for e, s in zip(expanded, shape)]
  return [g.op("Expand", [x, g.shape_tensor(target, allow_infer=False)])]


def _transpose(g, eqn, ins):
  return [g.op("Transpose", [_t(g, eqn, ins, 0)], perm=list(eqn.params["permutation"]))]


def _reduce(op):
  def h(g, eqn, ins):
    axes = g.const(np.asarray(eqn.params["axes"], np.int64), "axes")
    return [g.op(op, [_t(g, eqn, ins, 0), axes], keepdims=0)]
  return h


def _argmax(g, eqn, ins):
  axis, = eqn.params["axes"]
  idx = g.op("ArgMax", [_t(g, eqn, ins, 0)], axis=int(axis), keepdims=0)
  to = helper.np_dtype_to_tensor_dtype(np.dtype(eqn.params["index_dtype"]))
  return [g.op("Cast", [idx], to=to)]


def _select_n(g, eqn, ins):
  if len(ins) != 3:
    raise NotImplementedError("ONNX export: select_n with more than two cases.")
  pred = _t(g, eqn, ins, 0)
  if np.dtype(eqn.invars[0].aval.dtype) != np.bool_:
    pred = g.op("Cast", [pred], to=helper.np_dtype_to_tensor_dtype(np.dtype(np.bool_)))
  return [g.op("Where", [pred, _t(g, eqn, ins, 2), _t(g, eqn, ins, 1)])]


def _clamp(g, eqn, ins):  # clamp(lo, x, hi)
  x = g.op("Max", [_t(g, eqn, ins, 1), _t(g, eqn, ins, 0)])
  return [g.op("Min", [x, _t(g, eqn, ins, 2)])]


def _concatenate(g, eqn, ins):
  return [g.op("Concat", [_t(g, eqn, ins, i) for i in range(len(ins))],
               axis=int(eqn.params["dimension"]))]


_TO_END = 2**62  # a Slice end past the axis: to its end


def _slice(g, eqn, ins):
  start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
  steps = eqn.params["strides"] or (1,) * len(start)
  full = eqn.invars[0].aval.shape
  if any(not isinstance(s, int) for s in start) or any(
      not isinstance(l, int) and l is not full[i] and l != full[i] for i, l in enumerate(limit)):
    raise NotImplementedError("ONNX export: a slice whose bounds depend on the batch size.")
  limit = [l if isinstance(l, int) else _TO_END for l in limit]
  axes = [i for i in range(len(start))]
  c = lambda v: g.const(np.asarray(v, np.int64))  # noqa: E731
  return [g.op("Slice", [_t(g, eqn, ins, 0), c(start), c(limit), c(axes), c(steps)])]


def _split(g, eqn, ins):
  sizes = g.const(np.asarray(eqn.params["sizes"], np.int64))
  return g.node("Split", [_t(g, eqn, ins, 0), sizes], len(eqn.outvars),
                axis=int(eqn.params["axis"]))


def _pad(g, eqn, ins):
  cfg = eqn.params["padding_config"]
  if any(interior for _, _, interior in cfg):
    raise NotImplementedError("ONNX export: interior (dilating) padding.")
  pads = g.const(np.asarray([lo for lo, _, _ in cfg] + [hi for _, hi, _ in cfg], np.int64))
  return [g.op("Pad", [_t(g, eqn, ins, 0), pads, _t(g, eqn, ins, 1)], mode="constant")]


def _gather(g, eqn, ins):
  """Indexing along one axis (x[:, i], a table lookup) as ONNX Gather."""
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  shape = eqn.invars[0].aval.shape
  axes = tuple(dn.start_index_map)
  if len(axes) != 1 or tuple(dn.collapsed_slice_dims) != axes or \
      getattr(dn, "operand_batching_dims", ()) or any(
          (sizes[i] != 1) if i == axes[0] else (sizes[i] is not shape[i] and sizes[i] != shape[i])
          for i in range(len(shape))):
    raise NotImplementedError(f"ONNX export: a gather other than indexing one axis ({dn}).")
  axis = axes[0]
  idx = ins[1]
  if isinstance(idx, str):
    idx = g.op("Squeeze", [idx, g.const(np.asarray([-1], np.int64))])
  else:
    idx = g.const(np.asarray(idx)[..., 0].astype(np.int64))
  y = g.op("Gather", [_t(g, eqn, ins, 0), idx], axis=axis)
  n_batch = len(eqn.invars[1].aval.shape) - 1
  # ONNX: data axes before `axis`, the index axes, data axes after; JAX puts
  # the data (offset) axes at `offset_dims` and the index axes in the gaps.
  onnx_order = [("o", i) for i in range(axis)] + [("b", i) for i in range(n_batch)] + \
               [("o", i) for i in range(axis, len(shape) - 1)]
  out_rank = len(onnx_order)
  offset, batch = iter(range(len(shape) - 1)), iter(range(n_batch))
  jax_order = [("o", next(offset)) if d in dn.offset_dims else ("b", next(batch))
               for d in range(out_rank)]
  perm = [onnx_order.index(k) for k in jax_order]
  return [y if perm == list(range(out_rank)) else g.op("Transpose", [y], perm=perm)]


def _einsum_spec(eqn) -> str:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ln, rn = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
  letters = iter(string.ascii_letters)
  lhs, rhs = [None] * ln, [None] * rn
  for a, b in list(zip(lb, rb)) + list(zip(lc, rc)):
    lhs[a] = rhs[b] = next(letters)
  lhs = [x or next(letters) for x in lhs]
  rhs = [x or next(letters) for x in rhs]
  out = [lhs[a] for a in lb] + [lhs[i] for i in range(ln) if i not in lb and i not in lc] + \
        [rhs[i] for i in range(rn) if i not in rb and i not in rc]
  return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def _dot_general(g, eqn, ins):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  ln = len(eqn.invars[0].aval.shape)
  rhs = ins[1]
  if not lb and not rb and tuple(lc) == (ln - 1,) and tuple(rc) == (0,) and \
      len(eqn.invars[1].aval.shape) == 2:  # x @ W: a Dense layer
    return [g.op("MatMul", [_t(g, eqn, ins, 0), g.tensor(rhs)])]
  return [g.op("Einsum", [_t(g, eqn, ins, 0), _t(g, eqn, ins, 1)], equation=_einsum_spec(eqn))]


def _conv(g, eqn, ins):
  p = eqn.params
  dn = p["dimension_numbers"]
  if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
    raise NotImplementedError("ONNX export: transposed or batch-grouped convolutions.")
  # A layout spec lists (batch/out, feature/in, spatial...): ONNX's order.
  x = g.op("Transpose", [_t(g, eqn, ins, 0)], perm=list(dn.lhs_spec))
  rhs = ins[1]
  w = g.dequantize(rhs, dn.rhs_spec) if isinstance(rhs, Dequantized) else (
      g.const(np.transpose(np.asarray(rhs), dn.rhs_spec)) if not isinstance(rhs, str) else
      g.op("Transpose", [rhs], perm=list(dn.rhs_spec)))
  pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
  y = g.op("Conv", [x, w], strides=list(p["window_strides"]), pads=pads,
           dilations=list(p["rhs_dilation"]), group=int(p["feature_group_count"]))
  return [g.op("Transpose", [y], perm=list(np.argsort(dn.out_spec)))]


def _pool(kind):
  def h(g, eqn, ins):
    p = eqn.params
    win, strides, padding = p["window_dimensions"], p["window_strides"], p["padding"]
    if any(d != 1 for d in tuple(p["base_dilation"]) + tuple(p["window_dilation"])):
      raise NotImplementedError("ONNX export: dilated pooling windows.")
    active = [i for i in range(len(win)) if win[i] != 1 or strides[i] != 1 or
              padding[i] != (0, 0)]
    passive = [i for i in range(len(win)) if i not in active]
    if len(passive) != 2:
      raise NotImplementedError("ONNX export: pooling needs exactly two unpooled axes.")
    perm = passive + active
    x = g.op("Transpose", [_t(g, eqn, ins, 0)], perm=perm)
    pads = [padding[i][0] for i in active] + [padding[i][1] for i in active]
    kw = dict(kernel_shape=[win[i] for i in active], strides=[strides[i] for i in active],
              pads=pads)
    if kind == "max":
      y = g.op("MaxPool", [x], **kw)
    else:  # a window sum: the average with padding counted, times the window size
      y = g.op("AveragePool", [x], count_include_pad=1, **kw)
      y = g.op("Mul", [y, g.const(np.asarray(np.prod([win[i] for i in active]),
                                             eqn.invars[0].aval.dtype))])
    return [g.op("Transpose", [y], perm=list(np.argsort(perm)))]
  return h


HANDLERS: dict[str, Any] = {
    "add": _binary("Add"), "add_any": _binary("Add"), "sub": _binary("Sub"),
    "mul": _binary("Mul"), "div": _binary("Div"), "max": _binary("Max"),
    "min": _binary("Min"), "pow": _binary("Pow"), "gt": _binary("Greater"),
    "lt": _binary("Less"), "ge": _binary("GreaterOrEqual"), "le": _binary("LessOrEqual"),
    "eq": _binary("Equal"), "ne": _ne, "and": _binary("And"), "or": _binary("Or"),
    "not": _unary("Not"), "neg": _unary("Neg"), "exp": _unary("Exp"), "log": _unary("Log"),
    "tanh": _unary("Tanh"), "logistic": _unary("Sigmoid"), "sqrt": _unary("Sqrt"),
    "rsqrt": _rsqrt, "abs": _unary("Abs"), "erf": _unary("Erf"), "erfc": _erfc,
    "sign": _unary("Sign"), "floor": _unary("Floor"), "ceil": _unary("Ceil"),
    "log1p": _shifted("Log", 1.0, 0.0), "expm1": _shifted("Exp", 0.0, -1.0),
    "round": _round, "square": _square, "integer_pow": _integer_pow,
    "stop_gradient": _identity, "copy": _identity, "copy_p": _identity,
    "optimization_barrier": lambda g, eqn, ins: list(ins),
    "convert_element_type": _convert, "reshape": _reshape, "squeeze": _reshape,
    "expand_dims": _reshape, "broadcast_in_dim": _broadcast_in_dim, "transpose": _transpose,
    "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"), "reduce_prod": _reduce("ReduceProd"),
    "argmax": _argmax, "select_n": _select_n, "clamp": _clamp,
    "concatenate": _concatenate, "slice": _slice, "split": _split, "pad": _pad,
    "gather": _gather, "dot_general": _dot_general, "conv_general_dilated": _conv,
    "reduce_window_max": _pool("max"), "reduce_window_sum": _pool("sum"),
}
