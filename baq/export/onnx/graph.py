"""A jaxpr, interpreted into an ONNX graph.

`trace_to_onnx(fn, args)` traces `fn` to a jaxpr (with a symbolic batch
dimension when asked) and walks its equations, emitting ONNX nodes through
the handlers of `baq.export.onnx.ops`. Three rules keep the graph small and
faithful:

  * constant folding: an equation whose inputs are all known at export time
    (parameters, literals, iota) and whose output shape is static is
    evaluated here with JAX, so BatchNorm statistics, transposed float
    kernels and attention-bias gathers become initializers, not nodes;
  * calls are inlined (`jit`, `custom_jvp_call`, `custom_vjp_call`,
    `checkpoint`), except the *marked* functions of `baq.export.onnx.ops`
    (`dequantize_linear`, `activation_qdq`), which become
    DequantizeLinear / QuantizeLinear nodes;
  * a dequantized weight stays integer until a consumer asks for it, so a
    convolution can take its codes already in ONNX's OIHW layout.

A primitive without a handler raises an error that lists the supported ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 21  # int4 / uint4 Quantize- and DequantizeLinear, per-axis scales


@dataclasses.dataclass
class Dequantized:
  """Integer codes with their scale and zero point, not yet in the graph.

  `axis` is the codes' per-channel axis (None: per tensor); `dtype` the
  ONNX element type chosen for the codes.
  """
  codes: np.ndarray
  scale: np.ndarray
  zero_point: np.ndarray
  axis: Optional[int]
  dtype: int
  name: str


class Graph:
  """The nodes and initializers being built, and the values of the jaxpr."""

  def __init__(self):
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0
    self._dims: dict[Any, tuple[str, int]] = {}  # symbolic dim -> (tensor, axis)
    self._shape_of: dict[tuple[str, int], str] = {}
    self._consts: dict[int, tuple[np.ndarray, str]] = {}

  def fresh(self, hint: str) -> str:
    self._count += 1
    return f"{hint}_{self._count}"

  def const(self, value, hint: str = "c") -> str:
    """An initializer holding `value` (numpy array or scalar); an array
    already added is not added twice."""
    if isinstance(value, np.ndarray) and id(value) in self._consts:
      return self._consts[id(value)][1]
    name = self.fresh(getattr(value, "export_name", hint))
    self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
    if isinstance(value, np.ndarray):
      self._consts[id(value)] = (value, name)  # holds the array: its id stays unique
    return name

  def node(self, op: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> list[str]:
    outs = [self.fresh(op.lower()) for _ in range(n_out)]
    self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh("n_" + op),
                                       **attrs))
    return outs

  def op(self, op: str, inputs: Sequence[str], **attrs) -> str:
    return self.node(op, inputs, 1, **attrs)[0]

  def tensor(self, v, hint: str = "c") -> str:
    """The graph tensor of a value: a name as is, a constant as an initializer,
    integer codes as DequantizeLinear (in their stored layout)."""
    if isinstance(v, str):
      return v
    if isinstance(v, Dequantized):
      return self.dequantize(v)
    return self.const(v, hint)

  def dequantize(self, d: Dequantized, perm: Optional[Sequence[int]] = None) -> str:
    """DequantizeLinear of `d`'s codes, transposed by `perm` first."""
    codes, axis = d.codes, d.axis
    if perm is not None:
      codes = np.transpose(codes, perm)
      axis = None if axis is None else list(perm).index(axis)
    flat = (-1,) if axis is not None else ()
    np_type = helper.tensor_dtype_to_np_dtype(d.dtype)
    q = self.const(np.ascontiguousarray(codes).astype(np_type), d.name)
    scale = self.const(np.asarray(d.scale, np.float32).reshape(flat), d.name + "_scale")
    zp = self.const(np.asarray(d.zero_point).reshape(flat).astype(np_type), d.name + "_zero_point")
    attrs = {} if axis is None else {"axis": axis}
    return self.op("DequantizeLinear", [q, scale, zp], **attrs)

  # Symbolic shapes: the batch dimension is read from the graph at run time.
  def note_dims(self, name: str, shape: Sequence[Any]) -> None:
    for i, d in enumerate(shape):
      if not isinstance(d, int) and d not in self._dims:
        self._dims[d] = (name, i)

  def shape_tensor(self, shape: Sequence[Any], allow_infer: bool) -> str:
    """An int64 shape for Reshape/Expand: static entries as constants, a lone
    symbolic one as -1 (`allow_infer`), others read with Shape at run time."""
    symbolic = [d for d in shape if not isinstance(d, int)]
    if not symbolic:
      return self.const(np.asarray(shape, np.int64), "shape")
    if allow_infer and len(symbolic) == 1:
      return self.const(np.asarray([d if isinstance(d, int) else -1 for d in shape], np.int64),
                        "shape")
    parts = []
    for d in shape:
      if isinstance(d, int):
        parts.append(self.const(np.asarray([d], np.int64), "dim"))
        continue
      if d not in self._dims:
        raise NotImplementedError(f"ONNX export: the symbolic dimension {d} is not the size "
                                  "of any tensor seen so far; export with a fixed batch.")
      src, axis = self._dims[d]
      if (src, axis) not in self._shape_of:
        self._shape_of[(src, axis)] = self.op("Shape", [src], start=axis, end=axis + 1)
      parts.append(self._shape_of[(src, axis)])
    return self.op("Concat", parts, axis=0)


def _is_static(aval) -> bool:
  return all(isinstance(d, int) for d in getattr(aval, "shape", ()))


_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "checkpoint": "jaxpr", "remat": "jaxpr", "closed_call": "call_jaxpr"}


def _inner(eqn):
  j = eqn.params[_CALLS[eqn.primitive.name]]
  return (j.jaxpr, list(j.consts)) if hasattr(j, "consts") else (j, [])


def interpret(g: Graph, jaxpr, consts: Sequence[Any], args: Sequence[Any],
              handlers: dict[str, Callable], marked: dict[str, Callable]) -> list[Any]:
  """Walks `jaxpr` with input values `args` (names or constants)."""
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jax.extend.core.Literal) else env[v]

  def write(var, val):
    if type(var).__name__ == "DropVar":
      return
    env[var] = val
    if isinstance(val, str):
      g.note_dims(val, var.aval.shape)

  for var, val in zip(jaxpr.constvars, consts):
    write(var, np.asarray(val))
  for var, val in zip(jaxpr.invars, args):
    write(var, val)
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _CALLS and eqn.params.get("name") in marked:
      outs = marked[eqn.params["name"]](g, eqn, ins)
    elif name in _CALLS:
      inner, inner_consts = _inner(eqn)
      outs = interpret(g, inner, inner_consts, ins, handlers, marked)
    elif all(isinstance(x, (np.ndarray, np.generic, int, float, bool)) for x in ins) and \
        all(_is_static(v.aval) for v in eqn.outvars):
      res = eqn.primitive.bind(*[np.asarray(x) for x in ins], **eqn.params)
      outs = [np.asarray(r) for r in (res if eqn.primitive.multiple_results else [res])]
    elif name in handlers:
      outs = handlers[name](g, eqn, ins)
    else:
      raise NotImplementedError(
          f"ONNX export: no handler for the JAX primitive {name!r}. Supported: "
          f"{', '.join(sorted(set(handlers) | set(_CALLS)))}.")
    for var, val in zip(eqn.outvars, outs):
      write(var, val)
  return [read(v) for v in jaxpr.outvars]


class Named(np.ndarray):
  """A numpy array that carries the name its initializer gets (`named`)."""
  export_name = "c"


def named(value, name: str) -> Named:
  v = np.asarray(value).view(Named)
  v.export_name = name
  return v


def _named_leaves(params: Any) -> list[Named]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [named(np.asarray(leaf), "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                                         for k in path)) for path, leaf in leaves]


def trace_to_onnx(fn: Callable, example: jax.ShapeDtypeStruct, params: Any,
                  handlers: dict[str, Callable], marked: dict[str, Callable], *,
                  dynamic_batch: bool = True, input_name: str = "images",
                  output_name: str = "logits",
                  metadata: Optional[dict[str, str]] = None) -> onnx.ModelProto:
  """The ONNX model of `fn(x, params)` for inputs like `example` (batch axis
  first); `params` (a pytree of arrays) become named initializers.

  With `dynamic_batch` the batch axis is the symbolic dimension "N".
  """
  shape = tuple(example.shape)
  if dynamic_batch:
    n, = jax.export.symbolic_shape("N")
    shape = (n,) + shape[1:]
  closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(shape, example.dtype), params)
  g = Graph()
  g.note_dims(input_name, shape)
  out, = interpret(g, closed.jaxpr, closed.consts, [input_name] + _named_leaves(params),
                   handlers, marked)
  out = g.tensor(out)
  g.nodes.append(helper.make_node("Identity", [out], [output_name], name="output"))
  out_aval = closed.jaxpr.outvars[0].aval
  dims = lambda s: [d if isinstance(d, int) else "N" for d in s]  # noqa: E731
  np_to_onnx = helper.np_dtype_to_tensor_dtype
  in_type = np_to_onnx(np.dtype(example.dtype))
  graph = helper.make_graph(
      g.nodes, "baq", [helper.make_tensor_value_info(input_name, in_type, dims(shape))],
      [helper.make_tensor_value_info(output_name, np_to_onnx(np.dtype(out_aval.dtype)),
                                     dims(out_aval.shape))],
      initializer=g.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="baq")
  model.ir_version = 10
  helper.set_model_props(model, metadata or {})
  onnx.checker.check_model(model)
  return model
