"""Quantizer parametrizations: how a (fractional) bit-width quantizes a kernel in training.

A parametrization is one registered `Parametrization`, a small object in the
style of AQT's numerics: a name, whether it gives the bit-width a gradient,
whether it draws random numbers, and its training-time quantizer

    quantize(x, bits, key, **kw) -> fake-quantized x

where `kw` are the layer's range options (`QuantSpec.quant_kwargs`). At
evaluation and export every parametrization is replaced by the rounding
quantizer at integer bits, so a parametrization only shapes training.

Each lives in a file of this package and registers itself; the registry
imports every file of the package on its first lookup, so a new
parametrization is one new file (or a module named in `config.imports`):

    from baq.quant import parametrizations

    @parametrizations.register("my_param", trains_bits=True)
    def my_param(x, bits, key, **kw):
      ...
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from baq.registry import Registry


@dataclasses.dataclass(frozen=True)
class Parametrization:
  """One way of training with a bit-width.

  Attributes:
    name: the registry name (`config.quant.parametrization`).
    quantize: (x, bits, key, **range_kwargs) -> fake-quantized x; `key` is a
      PRNG key when `needs_rng`, else None.
    trains_bits: whether `bits` receives a gradient (BAQ needs one).
    needs_rng: whether `quantize` draws random numbers (the "quant" rng).
  """

  name: str
  quantize: Callable
  trains_bits: bool
  needs_rng: bool = False


PARAMETRIZATIONS: Registry[Parametrization] = Registry(
    "parametrization", discover="baq.quant.parametrizations")


def register(name: str, *, trains_bits: bool, needs_rng: bool = False) -> Callable:
  """Decorator registering `quantize(x, bits, key, **kw)` as parametrization `name`."""

  def wrap(fn: Callable) -> Callable:
    PARAMETRIZATIONS.register(name)(Parametrization(name, fn, trains_bits, needs_rng))
    return fn

  return wrap


def get(name: str) -> Parametrization:
  """The parametrization `name` (unknown names list the valid ones)."""
  return PARAMETRIZATIONS.get(name)
