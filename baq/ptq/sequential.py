"""Sequential GPTQ / Fair-GPTQ over any Flax model built from nn.Dense / nn.Conv.

Layers are found, in the order the model first calls them, by intercepting
`__call__` of every `nn.Dense` and `nn.Conv` (`flax.linen.intercept_methods`),
so no model needs code of its own; pass the float model (quantizer None). Each
layer in turn sees the inputs that the *already quantized* prefix produces:
the model is re-run on the calibration set with the quantized kernels written
so far, eagerly, and stopped as soon as the layer has been called. Memory per
batch is a layer's rows x kernel rows floats (patches): lower `batch_size` for
large feature maps.

A Dense layer's rows are its inputs flattened over leading dims; a Conv
layer's rows are patches taken with the layer's own strides, padding and
dilations, ordered like the HWIO kernel flattened to (H*W*I, O). Grouped
convolutions (depthwise included) are one GPTQ problem per feature group.

Fair-GPTQ layers also see paired inputs: `pairs = (x_a, x_b)` are two aligned
batches of model inputs (x_a[i] and x_b[i] show the same case for two
groups). For the embedded data, `counterfactual_pairs(...)['image'][0]` and
`[1]` (normalised); for real data, `baq.study.bias.pairs.match_pairs` picks them.

The returned params are the float model's, with dequantized kernels that lie
exactly on baq's per-channel grid; apply the float model to evaluate them.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import flax
import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from baq.quant import gptq, hessian

Patterns = Union[str, Sequence[str]]


class LayerSpec(NamedTuple):
  """What patch extraction needs to know about one Dense/Conv layer."""
  path: str
  conv: bool
  calls: int
  kernel_size: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: Any = "SAME"   # "SAME", "VALID" or ((lo, hi), ...).
  input_dilation: tuple[int, ...] = ()
  kernel_dilation: tuple[int, ...] = ()
  groups: int = 1


def _tuple(v, n):
  return (1,) * n if v is None else (v,) * n if isinstance(v, int) else tuple(v)


def _spec(m: nn.Module, path: str, calls: int) -> LayerSpec:
  """The (hashable) LayerSpec of a Dense/Conv module; raises if unsupported."""
  if isinstance(m, nn.Dense):
    return LayerSpec(path, False, calls)
  k = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(m.kernel_size)
  pad = canonicalize_padding(m.padding, len(k))
  if m.mask is not None or (isinstance(pad, str) and pad not in ("SAME", "VALID")):
    raise NotImplementedError(
        f"GPTQ: Conv {path} (padding {pad!r}, mask {m.mask is not None}) is not "
        "supported; SAME, VALID or explicit padding without a mask is.")
  pad = pad if isinstance(pad, str) else tuple(tuple(p) for p in pad)
  nd = len(k)
  return LayerSpec(path, True, calls, k, _tuple(m.strides, nd), pad,
                   _tuple(m.input_dilation, nd), _tuple(m.kernel_dilation, nd),
                   m.feature_group_count)


def conv_patches(x: jax.Array, spec: LayerSpec) -> jax.Array:
  """Patches [rows, prod(kernel_size) * C] of a conv input, HWIO-ordered.

  `patches @ kernel.reshape(-1, O)` equals the layer's convolution (groups 1).
  """
  nd = len(spec.kernel_size)
  x = jnp.reshape(x, (-1,) + x.shape[x.ndim - nd - 1:])
  spatial = tuple(range(1, nd + 1))
  dn = jax.lax.ConvDimensionNumbers((0, nd + 1) + spatial, (nd + 1, nd) + tuple(range(nd)),
                                    (0, nd + 1) + spatial)
  p = jax.lax.conv_general_dilated_patches(
      x, spec.kernel_size, spec.strides, spec.padding, spec.input_dilation,
      spec.kernel_dilation, dn, precision=jax.lax.Precision.HIGHEST)
  # lax orders patch features (C, *kernel); the HWIO kernel flattens (*kernel, C).
  k = int(np.prod(spec.kernel_size))
  p = p.reshape(-1, x.shape[-1], k)
  return jnp.swapaxes(p, 1, 2).reshape(-1, k * x.shape[-1])


def layer_rows(x: jax.Array, spec: LayerSpec, in_dim: int) -> jax.Array:
  """A layer's input as [groups, rows, d] (d: kernel rows per group).

  `in_dim` is a Dense layer's input size (unused for convs).
  """
  if not spec.conv:
    return jnp.reshape(x, (1, -1, in_dim))
  p = conv_patches(x, spec)
  k, c = int(np.prod(spec.kernel_size)), p.shape[1] // int(np.prod(spec.kernel_size))
  p = p.reshape(-1, k, spec.groups, c // spec.groups)
  return jnp.transpose(p, (2, 0, 1, 3)).reshape(spec.groups, -1, k * c // spec.groups)


class _Done(Exception):
  """Stops a forward pass once the target layer has been called."""


def _run(model, variables, x, apply_kwargs, target=None):
  """Applies the model; returns (specs in call order, inputs of `target`)."""
  seen: dict[str, list] = {}
  inputs: list = []

  def intercept(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.Conv)):
      path = "/".join(m.path)
      seen.setdefault(path, [m, 0])[1] += 1
      if target is not None and path == target.path:
        inputs.append(args[0] if args else kwargs["inputs"])
        if len(inputs) == target.calls:
          raise _Done()
    return next_fun(*args, **kwargs)

  try:
    with nn.intercept_methods(intercept):
      model.apply(variables, x, **(apply_kwargs or {}))
  except _Done:
    pass
  return [_spec(m, p, n) for p, (m, n) in seen.items()], inputs


def find_layers(model: nn.Module, variables: Any, x: jax.Array,
                apply_kwargs: Optional[dict] = None) -> list[LayerSpec]:
  """Every Dense/Conv layer of `model`, in first-call order (shape-only pass)."""
  out = []
  jax.eval_shape(lambda v, x: out.extend(_run(model, v, x, apply_kwargs)[0]),
                 variables, x)
  return out


def _matches(path: str, patterns: Patterns) -> bool:
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  return any(re.fullmatch(p, path) for p in patterns)


@functools.partial(jax.jit, static_argnames=("spec", "d"))
def _gram(x, spec, d, x_b=None):
  """Per-group X^T X [groups, d, d] of a layer input (or of x - x_b), and rows."""
  rows = layer_rows(x, spec, d * spec.groups).astype(jnp.float32)
  if x_b is not None:
    rows = rows - layer_rows(x_b, spec, d * spec.groups).astype(jnp.float32)
  return jnp.einsum("gni,gnj->gij", rows, rows), rows.shape[1]


def _layer_gram(model, variables, xs, spec, d, batch_size, apply_kwargs, xs_b=None):
  """Sums `_gram` over the batches of xs (paired with xs_b) and the layer's calls."""
  xtx, n = 0.0, 0
  for i in range(0, len(xs), batch_size):
    ins = _run(model, variables, xs[i:i + batch_size], apply_kwargs, spec)[1]
    ins_b = ([None] * len(ins) if xs_b is None else
             _run(model, variables, xs_b[i:i + batch_size], apply_kwargs, spec)[1])
    for x, x_b in zip(ins, ins_b):
      g, rows = _gram(x, spec, d, x_b)
      xtx, n = xtx + g, n + int(rows)
  return xtx, n


def _quantize_layer(w, b, spec, xtx, n, dtd, m, alpha, method, gptq_kwargs):
  """Quantizes a [d, O] kernel group by group; returns (W_q, record)."""
  og = w.shape[1] // spec.groups
  paired = dtd is not None
  xtx, dtd = np.asarray(xtx), (np.asarray(dtd) if paired else None)
  rec = dict(bits=b.tolist() if len(set(b.tolist())) > 1 else int(b[0]),
             fair=paired and alpha > 0, rows=n, loss=0.0, damp=0.0, err=0.0, err_rtn=0.0)
  if paired:
    rec.update(pairs=m, pair_err=0.0, pair_err_rtn=0.0)
  parts = []
  for g in range(spec.groups):
    cols = slice(g * og, (g + 1) * og)
    wg, bg = w[:, cols], b[cols]
    w_rtn = gptq.rtn(wg, bg, gptq_kwargs.get("group_size"))
    if method == "gptq":
      h = hessian.hessian(hessian.HessianStats(xtx[g], n))
      if paired:
        h = hessian.fair_hessian(h, hessian.hessian(hessian.HessianStats(dtd[g], m)), alpha)
      r = gptq.gptq(wg, h, bg, name=spec.path, **gptq_kwargs)
    else:
      r = gptq.GPTQResult(w_rtn, None, None, 0.0, 0.0)
    parts.append(r)
    rec["loss"] += r.loss
    rec["damp"] = max(rec["damp"], r.damp)
    rec["err"] += gptq.output_error(xtx[g], wg, r.weight) / n
    rec["err_rtn"] += gptq.output_error(xtx[g], wg, w_rtn) / n
    if paired:
      rec["pair_err"] += gptq.output_error(dtd[g], wg, r.weight) / m
      rec["pair_err_rtn"] += gptq.output_error(dtd[g], wg, w_rtn) / m
  if method == "gptq":
    rec["codes"] = np.concatenate([np.asarray(r.codes) for r in parts], 1)
    rec["scales"] = np.concatenate([np.asarray(r.scales) for r in parts], -1)
  return np.concatenate([np.asarray(r.weight) for r in parts], axis=1), rec


# Over 60 lines only by its docstring (Args and the records' fields); the
# body is the 40-line layer loop.
def quantize_model(model: nn.Module, variables: Any, calib: jax.Array, *,
                   bits: Union[int, Mapping[str, Any]] = 4, default_bits: int = 4,
                   float_layers: Patterns = (), fair_layers: Patterns = (),
                   pairs: Optional[tuple[jax.Array, jax.Array]] = None,
                   alpha: float = 0.0, method: str = "gptq", batch_size: int = 128,
                   apply_kwargs: Optional[dict] = None,
                   **gptq_kwargs) -> tuple[Any, dict[str, dict]]:
  """Quantizes every Dense/Conv kernel of a float model, layer by layer.

  Args:
    model: the float model (quantizer None).
    variables: its variables, {'params': ..., other collections ...}.
    calib: calibration model inputs [n, ...] (already normalised).
    bits: one integer bit-width for all layers, or {layer_path: bits} with an
      int or one int per output channel (a mixed-precision allocation).
    default_bits: bits of layers missing from a `bits` mapping.
    float_layers: regex(es) (re.fullmatch on the path) of layers kept float.
    fair_layers: regex(es) of layers that get the Fair term when alpha > 0.
    pairs: (x_a, x_b) aligned paired model inputs for the Fair term.
    alpha: weight of the Fair term (0 gives plain GPTQ, bit for bit).
    method: "gptq", or "rtn" (round to nearest on the same grid; baseline).
    batch_size: calibration examples per forward pass.
    apply_kwargs: extra `model.apply` arguments, e.g. {'train': False}.
    **gptq_kwargs: `gptq.gptq` options (block_size, group_size, act_order,
      percdamp).

  Returns:
    (params, records): params of the float model's tree with quantized
    kernels; records[path] = dict(bits, fair, rows, loss, damp, err, err_rtn,
    seconds[, pairs, pair_err, pair_err_rtn][, codes, scales]) where err is
    ||X (W - W_q)||^2 / rows of this method and err_rtn that of round to
    nearest, on this layer's calibration inputs; pair_err is the same over
    the `pairs` rows of X_a - X_b (layers in fair_layers, pairs given). GPTQ
    adds codes [prod(kernel.shape[:-1]), O] int32 (the kernel flattened like
    `conv_patches`) and scales [O] (or [groups of rows, O]).
  """
  if method not in ("gptq", "rtn"):
    raise ValueError(f"Unknown method {method!r}. Valid: gptq, rtn.")
  frozen = isinstance(variables["params"], flax.core.FrozenDict)
  variables = flax.core.unfreeze(variables)
  calib = np.asarray(calib)
  pairs = None if pairs is None else tuple(np.asarray(p) for p in pairs)
  flat = tu.flatten_dict(variables["params"])
  layers = find_layers(model, variables, calib[:batch_size], apply_kwargs)
  paths = [s.path for s in layers]
  if isinstance(bits, Mapping) and set(bits) - set(paths):
    raise ValueError(f"bits name unknown layers {sorted(set(bits) - set(paths))}; "
                     f"layers: {paths}.")
  records = {}
  for spec in layers:
    if _matches(spec.path, float_layers):
      continue
    t0 = time.perf_counter()
    key = tuple(spec.path.split("/")) + ("kernel",)
    kernel = flat[key]
    d, o = int(np.prod(kernel.shape[:-1])), kernel.shape[-1]
    b = bits.get(spec.path, default_bits) if isinstance(bits, Mapping) else bits
    b = np.broadcast_to(np.asarray(b, np.float32), (o,))
    args = (spec, d, batch_size, apply_kwargs)
    xtx, n = _layer_gram(model, variables, calib, *args)
    dtd, m = None, 0
    if _matches(spec.path, fair_layers) and (alpha > 0 or pairs is not None):
      if pairs is None or len(pairs[0]) != len(pairs[1]):
        raise ValueError(f"Fair layer {spec.path} needs two aligned pair batches.")
      dtd, m = _layer_gram(model, variables, pairs[0], *args, xs_b=pairs[1])
    w_q, rec = _quantize_layer(np.asarray(kernel, np.float32).reshape(d, o), b, spec,
                               xtx, n, dtd, m, alpha, method, gptq_kwargs)
    flat[key] = jnp.asarray(w_q.reshape(kernel.shape), kernel.dtype)
    variables["params"] = tu.unflatten_dict(flat)
    rec["seconds"] = time.perf_counter() - t0
    records[spec.path] = rec
  params = variables["params"]
  return (flax.core.freeze(params) if frozen else params), records
