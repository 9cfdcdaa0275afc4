"""Quantization injected into Flax layers through `dot_general_cls` hooks.

A model never contains quantization code of its own. It takes a `Quantizer`
(or None for the float baseline) and builds its layers with `Dense(quant)` /
`Conv(quant)`, which pass `dot_general_cls` / `conv_general_dilated_cls` to
Flax's own `nn.Dense` / `nn.Conv`. The injected op is a small module that
owns the layer's bit-width parameter(s) (leaf name `bits`, one per layer or
one per output channel) and fake-quantizes the kernel (and optionally the
activations) before calling the real `lax` op.

Which layers are quantized, and how, is decided by `rules`: (regex, spec)
pairs matched with `re.fullmatch` against the layer's module path ("Conv_0",
"block1/Dense_0"); the first match wins and a spec of None keeps that layer in
float. Layers that match no rule stay in float as well.

What the op computes is the quantizer's `QuantMode` (google/aqt's modes).

Mixed precision (a layer built with `dtype=jnp.bfloat16`): the input and
bias are cast to that dtype as Flax does, but the kernel reaches the injected
op in its float32 parameter dtype (`_promote_keep_kernel`), so its scale,
rounding and bit-width parametrization are computed in float32; only the
quantized kernel is cast to the input's dtype for the matmul or convolution.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import re
from typing import Any, Optional

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
import jax.numpy as jnp

from baq.quant import fake_quant as fq, parametrizations

GRANULARITIES = ("layer", "channel")
BITS_LEAF = "bits"
RANGE_LEAF = "log_range"
# The quantizer's own parameters: never in a float checkpoint, replicated
# across devices, held fixed by weight-only analyses.
QUANT_LEAVES = (BITS_LEAF, RANGE_LEAF)
QUANT_LEAF_PATTERN = rf".*/({BITS_LEAF}|{RANGE_LEAF})"
EXPORT_COLLECTION = "quant_export"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one layer is quantized.

  Attributes:
    init_bits: initial bit-width of the layer's unit(s).
    min_bits: lower bound of the trainable bit-width.
    max_bits: upper bound of the trainable bit-width.
    granularity: "layer" (one bit-width, one scale) or "channel" (one
      bit-width and one scale per output channel).
    parametrization: a name in `baq.quant.parametrizations` ("fracbits":
      interpolate floor/floor+1 quantizers; "diffq": pseudo-quantization
      noise in training; "fixed": round the bit-width, for uniform QAT).
    symmetric: signed symmetric codes, else unsigned with a zero point.
    scale_method: "absmax", "percentile", "learned" or "mse" (see fake_quant).
    percentile: for the percentile scale method.
    act_bits: if set, activations entering the layer are fake-quantized
      per example at this integer bit-width (dynamic absmax range).
    numerics: if set, a name in `baq.quant.numerics` (llm_int8, nf4,
      dynamic_int8): the layer computes as that runtime does instead of
      baq's fake quantization, with no `bits` leaf. A Dense layer runs the
      numeric's product; a Conv stays float, as in the runtimes
      (bitsandbytes and torch's dynamic quantization replace Linear layers
      only).
    numerics_options: (name, value) pairs passed to the numeric.
  """

  init_bits: float = 8.0
  min_bits: float = 2.0
  max_bits: float = 8.0
  granularity: str = "channel"
  parametrization: str = "fracbits"
  symmetric: bool = True
  scale_method: str = "absmax"
  percentile: float = 99.9
  act_bits: Optional[int] = None
  numerics: Optional[str] = None
  numerics_options: tuple = ()

  def __post_init__(self):
    parametrizations.get(self.parametrization)  # unknown names list the valid ones
    if self.numerics is not None:
      from baq.quant import numerics  # pylint: disable=import-outside-toplevel
      numerics.NUMERICS.get(self.numerics)
    for field, valid in (("granularity", GRANULARITIES),
                         ("scale_method", fq.SCALE_METHODS)):
      if getattr(self, field) not in valid:
        raise ValueError(
            f"Unknown {field} {getattr(self, field)!r}. Valid: {', '.join(valid)}.")
    lowest = 2.0 if self.symmetric else 1.0
    if not lowest <= self.min_bits <= self.max_bits:
      raise ValueError(
          f"Need {lowest} <= min_bits <= max_bits, got min_bits={self.min_bits}, "
          f"max_bits={self.max_bits} (symmetric={self.symmetric}).")
    if not self.min_bits <= self.init_bits <= self.max_bits:
      raise ValueError(
          f"init_bits={self.init_bits} is outside [min_bits, max_bits] = "
          f"[{self.min_bits}, {self.max_bits}].")

  @property
  def channel_axis(self) -> Optional[int]:
    # Flax kernels keep output features last (Dense: (in, out); Conv: HWIO).
    return -1 if self.granularity == "channel" else None

  def quant_kwargs(self, learned_range=None) -> dict[str, Any]:
    return dict(symmetric=self.symmetric, channel_axis=self.channel_axis,
                method=self.scale_method, percentile=self.percentile,
                learned_range=learned_range)


class QuantMode(enum.Enum):
  """What a quantized layer computes. One enum, not three switches, so that
  combinations the op never honoured (capture while training) can't be asked.

  Members:
    TRAIN: the spec's parametrization at fractional bit-widths (fracbits,
      diffq noise) with straight-through gradients: bits and weights learn.
    EVAL: bit-widths rounded to integers, the rounding quantizer: as deployed.
    CONVERT: EVAL that also sows each layer's integer codes, scale, zero point
      and bits into the `quant_export` collection, for the export.
    SERVE: kernels pass through (no `bits` leaf) while activations are still
      quantized: the model that runs exported, already-dequantized weights.
  """

  TRAIN = "train"
  EVAL = "eval"
  CONVERT = "convert"
  SERVE = "serve"


@dataclasses.dataclass(frozen=True)
class Quantizer:
  """The quantization factory handed to a model.

  Attributes:
    rules: (regex, QuantSpec | None) pairs; first full match on the layer path
      wins; unmatched layers stay float.
    mode: a `QuantMode`; TRAIN for training, EVAL for deployed evaluation.
  """

  rules: tuple[tuple[str, Optional[QuantSpec]], ...]
  mode: QuantMode = QuantMode.TRAIN

  def __post_init__(self):
    if not isinstance(self.mode, QuantMode):  # a leftover bool or string
      raise TypeError(f"Quantizer.mode must be a QuantMode, got {self.mode!r}.")

  def spec_for(self, path: str) -> Optional[QuantSpec]:
    for pattern, spec in self.rules:
      if re.fullmatch(pattern, path):
        return spec
    return None

  def replace(self, **kwargs) -> "Quantizer":
    return dataclasses.replace(self, **kwargs)


def _layer_path(module: nn.Module) -> str:
  # The op module sits directly under the layer that owns the kernel.
  return "/".join(module.path[:-1])


class _QuantOp(nn.Module):
  """Fake-quantizes (lhs, rhs) then applies `_op`; owns the `bits` leaf."""

  quantizer: Quantizer

  def _op(self, lhs, rhs, *args, **kwargs):
    raise NotImplementedError

  def _numerics_op(self, spec, lhs, rhs, *args, **kwargs):
    raise NotImplementedError

  def _compute(self, lhs, rhs, *args, **kwargs):
    # The op runs in the input's dtype (bfloat16 under mixed precision) on the
    # kernel as quantized in float32; without preferred_element_type its
    # output stays in that dtype too: accelerators accumulate bf16 products in
    # float32 inside the op anyway, a bf16 output halves the activations'
    # memory traffic, and the norms after it reduce in float32 (Flax's rule).
    return self._op(lhs, rhs.astype(lhs.dtype), *args, **kwargs)

  @nn.compact
  def __call__(self, lhs, rhs, *args, **kwargs):
    spec = self.quantizer.spec_for(_layer_path(self))
    if spec is None:
      return self._compute(lhs, rhs, *args, **kwargs)
    if spec.numerics is not None:
      return self._numerics_op(spec, lhs, rhs, *args, **kwargs)
    if spec.act_bits is not None:  # the activation's range and rounding in float32 too
      lhs = fq.activation_fake_quant(lhs.astype(jnp.float32), spec.act_bits,
                                     spec.symmetric).astype(lhs.dtype)
    mode = self.quantizer.mode
    if mode is QuantMode.SERVE:
      return self._compute(lhs, rhs, *args, **kwargs)
    units = () if spec.channel_axis is None else (rhs.shape[-1],)
    bits = self.param(BITS_LEAF, nn.initializers.constant(spec.init_bits),
                      units, jnp.float32)
    learned_range = None
    if spec.scale_method == "learned":
      init_range = jnp.log(jnp.max(jnp.abs(rhs), fq.reduce_axes(rhs.ndim, spec.channel_axis)))
      learned_range = jnp.exp(self.param(RANGE_LEAF, lambda *_: init_range))
    kw = spec.quant_kwargs(learned_range)
    if mode is QuantMode.TRAIN:
      param = parametrizations.get(spec.parametrization)
      key = self.make_rng("quant") if param.needs_rng else None
      return self._compute(lhs, param.quantize(rhs, bits, key, **kw), *args, **kwargs)
    # As deployed: the rounding quantizer at integer bits, whatever trained them.
    int_bits = jax.lax.stop_gradient(jnp.round(bits))
    if mode is QuantMode.CONVERT:
      self._sow_codes(rhs, int_bits, kw)
    return self._compute(lhs, fq.fake_quant(rhs, int_bits, **kw), *args, **kwargs)

  def _sow_codes(self, rhs, int_bits, kw):
    b = fq.channel_view(int_bits, rhs.ndim, kw["channel_axis"])
    lo, hi = fq.range_stats(rhs, bits=b, **kw)
    scale, zp = fq.scale_and_zero_point(lo, hi, b, kw["symmetric"])
    codes = fq.quantize_codes(rhs, scale, zp, b, kw["symmetric"])
    self.sow(EXPORT_COLLECTION, "weight",
             dict(codes=codes, scale=scale, zero_point=zp, bits=int_bits),
             reduce_fn=lambda _, new: new)


def _numeric(spec: QuantSpec):
  from baq.quant import numerics  # pylint: disable=import-outside-toplevel
  return numerics.NUMERICS.get(spec.numerics), dict(spec.numerics_options)


class QuantDotGeneral(_QuantOp):

  def _op(self, lhs, rhs, *args, **kwargs):
    return jax.lax.dot_general(lhs, rhs, *args, **kwargs)

  def _numerics_op(self, spec, lhs, rhs, *args, **kwargs):
    dims = args[0] if args else kwargs["dimension_numbers"]
    if tuple(map(tuple, dims[0])) != ((lhs.ndim - 1,), (0,)) or any(dims[1]):
      raise NotImplementedError(f"{_layer_path(self)}: numerics {spec.numerics!r} compute "
                                "x @ w of a Dense layer only.")
    numeric, options = _numeric(spec)
    return numeric.dot(lhs, rhs, **options).astype(lhs.dtype)


class QuantConv(_QuantOp):

  def _op(self, lhs, rhs, *args, **kwargs):
    return jax.lax.conv_general_dilated(lhs, rhs, *args, **kwargs)

  def _numerics_op(self, spec, lhs, rhs, *args, **kwargs):
    del spec  # the runtimes keep convolutions in float
    return self._compute(lhs, rhs, *args, **kwargs)


def _promote_keep_kernel(inputs, kernel, bias=None, *, dtype=None):
  """Flax's `promote_dtype` for the input and bias; the kernel keeps its dtype.

  Flax would cast the kernel to the compute dtype before the injected op sees
  it, and a bfloat16 kernel (8 significant bits) would be rounded before its
  scale and codes are computed. The op casts it after quantizing instead.
  """
  if dtype is None:  # Flax's inference, from all three
    dtype = flax_dtypes.canonicalize_dtype(inputs, kernel, bias)
  inputs, bias = flax_dtypes.promote_dtype(inputs, bias, dtype=dtype)
  return inputs, kernel, bias


def _layer(cls, hook: str, op_cls, quantizer: Optional[Quantizer], dtype):
  kw = {} if dtype is None else dict(dtype=dtype)
  if quantizer is None:
    return functools.partial(cls, **kw) if kw else cls
  return functools.partial(cls, promote_dtype=_promote_keep_kernel,
                           **{hook: functools.partial(op_cls, quantizer)}, **kw)


def Dense(quantizer: Optional[Quantizer], dtype=None):  # pylint: disable=invalid-name
  """`nn.Dense`, with quantization injected when a quantizer is given.

  Args:
    quantizer: the quantization factory, or None for a float layer.
    dtype: the compute dtype (None: Flax's, from the input and parameters);
      parameters stay float32 and are quantized in float32.

  Returns:
    The (partially applied) layer class.
  """
  return _layer(nn.Dense, "dot_general_cls", QuantDotGeneral, quantizer, dtype)


def Conv(quantizer: Optional[Quantizer], dtype=None):  # pylint: disable=invalid-name
  """`nn.Conv`, with quantization injected when a quantizer is given (Args as `Dense`)."""
  return _layer(nn.Conv, "conv_general_dilated_cls", QuantConv, quantizer, dtype)
