"""Quantization methods: one registry of names, kinds and nominal bits for every driver.

A setting is spelled `name[@bits][:a<alpha>]` (`parse`, inverted by `format`):

  fp32               the float model (kind "float"; no @bits, 32 nominal bits)
  rtn@4, gptq@4      round to nearest / GPTQ at 4 bits (kind "ptq")
  fair_gptq@4:a0.5   Fair-GPTQ at 4 bits, pair weight 0.5 (kind "ptq")
  qat@4              uniform QAT at 4 bits (kind "qat"; the main job's uniform4)
  baq@3.5            BAQ's bit search at 3.5 average bits (kind "search")
  fair_static@4, fair_static_qat@4
                     the main job's importance allocation at a 4-bit budget,
                     applied post-training or then fine-tuned (kind "search")
  mixed@3            group-aware mixed precision at 3 average bits (kind "search")
  nf4, llm_int8, ... every runtime numeric of `baq.quant.numerics.NUMERICS`
                     (kind "numerics"; no @bits: its code bits come from the
                     numeric's own `storage`)

The numerics methods are derived from NUMERICS at every lookup, so a numeric
registered there is a method of every driver with no other change. A driver
runs a subset of the methods (`Choices`: some by name, and every method of
some kinds) and maps kinds to its own compute functions; `nominal_bits` is
the bits a setting reports.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence, Union

import numpy as np

from baq.quant.numerics import NUMERICS
from baq.registry import Registry

KINDS = ("float", "qat", "ptq", "search", "numerics")
FULL_ROW = 4096  # a kernel's d_in that every numeric's block divides
LEVELS = ("bits", "budget")  # what `@` gives: a bit-width, or an average-bit budget
_GRAMMAR = re.compile(r"(?P<name>[A-Za-z0-9_]+)(?:@(?P<level>[^:]*))?(?::a(?P<alpha>.*))?")


@dataclasses.dataclass(frozen=True)
class Method:
  """One quantization method.

  Attributes:
    name: the registry name (the part of a setting before `@`).
    kind: one of KINDS; a driver maps kinds to its compute functions.
    takes: "bits" (a bit-width), "budget" (average bits), or None (no @).
    alpha: whether a Fair-GPTQ pair weight `:a<alpha>` may follow.
    description: one line.
    bounds: the (lowest, highest) bits or budget `@` may give.
    integer: whether `@` must give an integer.
  """

  name: str
  kind: str
  takes: Optional[str]
  alpha: bool
  description: str
  bounds: tuple[float, float] = (2.0, 8.0)
  integer: bool = True

  def usage(self) -> str:
    """How a setting of this method is spelled ("fair_gptq@<bits>[:a<alpha>]")."""
    return (self.name + (f"@<{self.takes}>" if self.takes else "") +
            ("[:a<alpha>]" if self.alpha else ""))


def _numerics_methods() -> dict[str, Method]:
  """A "numerics" method per numeric registered in NUMERICS, now."""
  return {n: Method(n, "numerics", None, False, f"the runtime numeric {n} "
                    f"({NUMERICS.get(n).source})")
          for n in NUMERICS.names()}


METHODS: Registry[Method] = Registry("quantization method", derive=_numerics_methods)

for _method in (
    Method("fp32", "float", None, False, "the float model"),
    Method("rtn", "ptq", "bits", False, "round to nearest on the per-channel absmax grid"),
    Method("gptq", "ptq", "bits", False, "GPTQ on the per-channel grid, calibrated"),
    Method("fair_gptq", "ptq", "bits", True, "Fair-GPTQ: GPTQ plus alpha x a pair term"),
    Method("qat", "qat", "bits", False, "uniform QAT at fixed bits", (1.0, 16.0), False),
    Method("baq", "search", "budget", False, "BAQ: bits and weights trained at a budget",
           (1.0, 16.0), False),
    Method("fair_static", "search", "budget", False,
           "group-aware importance allocation at a budget, applied post-training",
           (1.0, 16.0), False),
    Method("fair_static_qat", "search", "budget", False,
           "the importance allocation, then the weights fine-tuned at it", (1.0, 16.0), False),
    Method("mixed", "search", "budget", True,
           "group-aware mixed precision from layer importance, then (Fair-)GPTQ / RTN",
           (2.0, 8.0), False),
):
  METHODS.register(_method.name)(_method)
del _method


def get(name: str) -> Method:
  """The method `name` (a KeyError lists the valid names)."""
  return METHODS.get(name)


def of_kind(*kinds: str) -> list[str]:
  """The names of every method of `kinds`, sorted.

  Raises:
    ValueError: an unknown kind (the valid ones listed).
  """
  bad = [k for k in kinds if k not in KINDS]
  if bad:
    raise ValueError(f"Unknown method kinds {bad}. Valid: {', '.join(KINDS)}.")
  return [n for n in METHODS.names() if METHODS.get(n).kind in kinds]


def _split(text: str) -> re.Match:
  m = _GRAMMAR.fullmatch(str(text).strip())
  if m is None:
    raise ValueError(f"{text!r} is not a setting: write name[@bits][:a<alpha>], "
                     f"e.g. gptq@4 or fair_gptq@4:a0.5.")
  return m


def _check(method: Method, text: str, level: Optional[str], alpha: Optional[str]):
  """(bits, alpha) of `text`, checked against what `method` takes."""
  if method.takes is None and level is not None:
    why = (f"a runtime's numerics: its code bits ({nominal_bits(method.name):g}) come from "
           f"its storage" if method.kind == "numerics" else f"kind {method.kind!r}")
    raise ValueError(f"{text!r}: {method.name} takes no @bits ({why}); write {method.name}.")
  lo, hi = method.bounds
  bound = f"{'an integer' if method.integer else 'a number'} in [{lo:g}, {hi:g}]"
  if method.takes is not None and level is None:
    raise ValueError(f"{text!r}: {method.name} takes {method.takes}: write {method.usage()}, "
                     f"the {method.takes} {bound}.")
  bits = None
  if level is not None:
    try:
      bits = float(level)
    except ValueError:
      bits = math.nan
    if not (lo <= bits <= hi and (bits == int(bits) or not method.integer)):
      raise ValueError(f"{text!r}: {method.name}'s {method.takes} must be {bound}.")
  if alpha is None:
    return bits, None
  if not method.alpha:
    raise ValueError(f"{text!r}: {method.name} takes no alpha; the methods with one: "
                     f"{', '.join(n for n in METHODS.names() if METHODS.get(n).alpha)}.")
  try:
    a = float(alpha)
  except ValueError:
    a = math.nan
  if not (math.isfinite(a) and a >= 0):
    raise ValueError(f"{text!r}: alpha {alpha!r} must be finite and >= 0.")
  return bits, a


def parse(text: str) -> tuple[Method, Optional[float], Optional[float]]:
  """A setting's (method, bits or budget, alpha): "fair_gptq@4:a0.5" -> (Method, 4.0, 0.5).

  Args:
    text: `name[@bits][:a<alpha>]`.

  Returns:
    The method; the bits or budget after `@` (None for a method that takes
    none); the alpha (None when not given).

  Raises:
    KeyError: an unknown method (the valid names listed).
    ValueError: the text breaks the grammar or the method's bounds (named).
  """
  m = _split(text)
  method = METHODS.get(m["name"])
  return (method,) + _check(method, text, m["level"], m["alpha"])


def format(method: Union[Method, str],  # pylint: disable=redefined-builtin
           bits: Optional[float] = None, alpha: Optional[float] = None) -> str:
  """The setting `parse` reads back: format("fair_gptq", 4, 0.5) -> "fair_gptq@4:a0.5".

  Raises:
    KeyError, ValueError: as `parse`, for the setting this would spell.
  """
  name = method.name if isinstance(method, Method) else method
  text = (name + ("" if bits is None else f"@{float(bits):g}") +
          ("" if alpha is None else f":a{float(alpha):g}"))
  parse(text)
  return text


def nominal_bits(text: str, options: Optional[dict] = None) -> float:
  """The bits a setting reports: its numeric's code bits, 32 for float, else its @bits.

  Args:
    text: a setting (`parse`).
    options: a numerics method's options (its runtime's defaults where not given).

  Returns:
    A numeric's bits per weight code (`Numeric.storage`), 32.0 for the float
    model, else the bits or budget of the setting.
  """
  method, bits, _ = parse(text)
  if method.kind == "numerics":
    numeric = NUMERICS.get(method.name)
    # Bits per code do not depend on the kernel's shape, once its rows fill whole
    # blocks (a ggml type stores rows that do not in another type); the scales' bits do.
    return float(numeric.storage(FULL_ROW, 1, **dict(numeric.options(), **(options or {})))[0])
  return 32.0 if method.kind == "float" else float(bits)


def stored_bits(text: str, shapes: Sequence[tuple[int, int]],
                options: Optional[dict] = None) -> dict:
  """What a runtime's numerics store for these kernels, numel-weighted.

  `nominal_bits` is a type's code bits on rows that fill its blocks; a real
  model's kernels may not (llama.cpp keeps q4_k rows of 64 as q5_0 and rows
  of 172 in F16), so a study reports what its kernels are stored in.

  Args:
    text: a numerics setting (`parse`).
    shapes: the [d_in, d_out] of every kernel it quantizes.
    options: the numeric's options (its runtime's defaults where not given).

  Returns:
    {"code_bits": mean bits per weight code, "bits_per_weight": the same with
    the scales' and statistics' bits spread over the weights}.
  """
  method, _, _ = parse(text)
  if method.kind != "numerics":
    raise ValueError(f"stored_bits reads a runtime's numerics; {text!r} is a {method.kind}.")
  if not shapes:
    raise ValueError("stored_bits needs at least one kernel shape.")
  numeric = NUMERICS.get(method.name)
  opts = dict(numeric.options(), **(options or {}))
  n = np.asarray([d_in * d_out for d_in, d_out in shapes], np.float64)
  st = np.asarray([numeric.storage(int(d_in), int(d_out), **opts) for d_in, d_out in shapes],
                  np.float64)
  return dict(code_bits=float((st[:, 0] * n).sum() / n.sum()),
              bits_per_weight=float(((st[:, 0] * n).sum() + st[:, 1].sum()) / n.sum()))


class Choices:
  """The methods one driver runs: some by name, and every method of some kinds.

  Args:
    what: what the driver calls them, for messages ("bias study quantizer").
    names: registered method names the driver runs, in its order.
    kinds: kinds whose every method the driver runs (e.g. ("numerics",)).
  """

  def __init__(self, what: str, names: Sequence[str] = (), kinds: Sequence[str] = ()):
    for n in names:
      METHODS.get(n)  # a typo fails at import, listing the valid names
    of_kind(*kinds)
    self.what, self._names, self._kinds = what, tuple(names), tuple(kinds)

  def names(self) -> list[str]:
    """The named methods, then every method of the kinds (now), sorted."""
    return list(self._names) + [n for n in of_kind(*self._kinds) if n not in self._names]

  def __contains__(self, name: str) -> bool:
    return name in self.names()

  def __iter__(self):
    return iter(self.names())

  def get(self, name: str) -> Method:
    """The method `name`, if the driver runs it.

    Raises:
      KeyError: it does not; the message lists the ones it runs.
    """
    if name not in self.names():
      raise KeyError(f"Unknown {self.what} {name!r}. Valid {self.what} names: "
                     f"{', '.join(self.names())}.")
    return METHODS.get(name)

  def parse(self, text: str) -> tuple[Method, Optional[float], Optional[float]]:
    """`parse(text)` of a method the driver runs (else a KeyError listing those)."""
    self.get(_split(text)["name"])
    return parse(text)


RUNTIMES = Choices("runtime numerics", kinds=("numerics",))
