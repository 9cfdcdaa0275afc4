"""Training modes: how a config turns into a quantizer and trainable leaves.

  float            no quantizer; the full-precision baseline.
  qat              uniform fake-quant QAT at `config.qat_bits` (bits frozen).
  fair_static      FairQuant's static mode: integer bits from the group-aware
                   importance allocation (`baq.allocation.planner`), applied post-training
                   to the float weights; no training.
  fair_static_qat  the same allocation, then the weights fine-tuned at it.
  baq              Bit-Aware Quantization: weights and per-unit fractional
                   bit-widths trained jointly under the bit budget and the
                   penalties; starts at the budget, or at the allocation when
                   `config.quant.init_from == "allocation"`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import ml_collections

from baq.quant import parametrizations, units
from baq.quant.inject import Quantizer, QuantSpec
from baq.registry import Registry


@dataclasses.dataclass(frozen=True)
class ModeSpec:
  """What a mode trains.

  Attributes:
    quantizer: the injected quantization factory (None: float model).
    train_bits: whether the bit-width leaves are trained.
    uses_budget: whether the run has a bit budget.
    init_allocation: whether the bits start at the importance allocation.
    trains: whether the mode trains at all (False: post-training only).
  """

  quantizer: Optional[Quantizer]
  train_bits: bool
  uses_budget: bool
  init_allocation: bool = False
  trains: bool = True


MODES: Registry[Callable[..., ModeSpec]] = Registry("mode")


def quant_rules(qc: ml_collections.ConfigDict, **overrides) -> tuple:
  """The (regex, QuantSpec | None) rules of `config.quant`, first full match wins.

  In order: `float_layers` (a regex; shorthand for the rule (regex, None),
  float), then each (regex, options) pair of `quant.rules` (None: float; a
  dict: the config's spec with those fields changed, e.g.
  ("Conv_0", {"granularity": "layer"})), then every other layer with the
  config's spec. `overrides` (a mode's own settings) apply to every spec.

  Raises:
    ValueError: a rule names an option QuantSpec does not have.
  """
  fields = {f.name for f in dataclasses.fields(QuantSpec)}
  kw = {k: v for k, v in qc.to_dict().items() if k in fields}
  if kw.get("init_bits") is None:
    # "Start at the budget": the trainer sets the bits once the budget is
    # known (a size budget needs the parameter counts); any valid value here.
    kw["init_bits"] = qc.max_bits
  kw.update(overrides)
  rules = [(qc.float_layers, None)] if qc.float_layers else []
  for pattern, options in qc.get("rules", ()) or ():
    unknown = sorted(set(options or {}) - fields)
    if unknown:
      raise ValueError(f"quant.rules entry {pattern!r} has unknown options {unknown}. "
                       f"Valid: {', '.join(sorted(fields))}.")
    rules.append((pattern, None if options is None else
                  QuantSpec(**dict(kw, **dict(options), **overrides))))
  return tuple(rules) + ((".*", QuantSpec(**kw)),)


@MODES.register("float")
def _float(config: ml_collections.ConfigDict, bits: Optional[float] = None) -> ModeSpec:
  del config, bits
  return ModeSpec(None, train_bits=False, uses_budget=False)


@MODES.register("qat")
def _qat(config: ml_collections.ConfigDict, bits: Optional[float] = None) -> ModeSpec:
  b = float(config.qat_bits if bits is None else bits)
  rules = quant_rules(config.quant, init_bits=b, parametrization="fixed",
                      min_bits=min(b, config.quant.min_bits),
                      max_bits=max(b, config.quant.max_bits))
  return ModeSpec(Quantizer(rules), train_bits=False, uses_budget=False)


@MODES.register("baq")
def _baq(config: ml_collections.ConfigDict, bits: Optional[float] = None) -> ModeSpec:
  del bits
  if not parametrizations.get(config.quant.parametrization).trains_bits:
    valid = [n for n in parametrizations.PARAMETRIZATIONS.names()
             if parametrizations.get(n).trains_bits]
    raise ValueError(f"mode=baq trains bit-widths; parametrization "
                     f"{config.quant.parametrization!r} gives them no gradient. "
                     f"Use one of: {', '.join(valid)}.")
  init_from = config.quant.get("init_from", "budget")
  if init_from not in ("budget", "allocation"):
    raise ValueError(f"Unknown quant.init_from {init_from!r}. Valid: budget, allocation.")
  return ModeSpec(Quantizer(quant_rules(config.quant)), train_bits=True, uses_budget=True,
                  init_allocation=init_from == "allocation")


def _fixed_allocation(config: ml_collections.ConfigDict, trains: bool) -> ModeSpec:
  # Any valid init_bits: the planner's integer bits replace them.
  rules = quant_rules(config.quant, parametrization="fixed")
  return ModeSpec(Quantizer(rules), train_bits=False, uses_budget=True,
                  init_allocation=True, trains=trains)


@MODES.register("fair_static")
def _fair_static(config: ml_collections.ConfigDict, bits: Optional[float] = None) -> ModeSpec:
  del bits
  return _fixed_allocation(config, trains=False)


@MODES.register("fair_static_qat")
def _fair_static_qat(config: ml_collections.ConfigDict,
                     bits: Optional[float] = None) -> ModeSpec:
  del bits
  return _fixed_allocation(config, trains=True)


def get_mode(config: ml_collections.ConfigDict, name: str,
             bits: Optional[float] = None) -> ModeSpec:
  """The ModeSpec of mode `name` (unknown names list the valid ones)."""
  return MODES.get(name)(config, bits)


def selected(config: ml_collections.ConfigDict) -> list[str]:
  """The modes of `config.mode` ("fair_static,baq" -> ["fair_static", "baq"]).

  Raises:
    ValueError: `config.mode` names no mode.
  """
  out = [m.strip() for m in config.mode.split(",") if m.strip()]
  if not out:
    raise ValueError(f"config.mode is empty. Valid modes: {', '.join(MODES.names())}.")
  return out


def budget_bits(config: ml_collections.ConfigDict, params: Any, layers,
                batch_stats: Any = None) -> float:
  """The average-bit budget, from `quant.target_bits` or a `quant.target_bytes` size budget.

  A size budget counts what `units.model_bytes` counts (the BatchNorm
  statistics when given, zero points when the codes are asymmetric).

  Raises:
    ValueError: no budget is set, or it lies outside [min_bits, max_bits].
  """
  q = config.quant
  if q.target_bytes is not None:
    t = units.bits_for_bytes(params, layers, q.target_bytes, symmetric=q.symmetric,
                             batch_stats=batch_stats)
    where = f"target_bytes={q.target_bytes} (= {t:.3f} average bits)"
  elif q.target_bits is not None:
    t, where = float(q.target_bits), f"target_bits={q.target_bits}"
  else:
    raise ValueError("This mode needs a budget: set quant.target_bits or quant.target_bytes.")
  try:
    units.check_budget(t, q.min_bits, q.max_bits)
  except ValueError as e:
    raise ValueError(f"Impossible budget {where}: {e}") from None
  return t


def run_steps(config: ml_collections.ConfigDict, spec: ModeSpec) -> int:
  """A mode's training steps in the main job: `steps`, plus the bit search.

  With `quant.search_steps` set, a bit-training mode searches for that many
  steps and then trains the weights `config.steps` steps at the projected
  integer bits; every other mode trains `config.steps` steps (0 when it
  does not train).
  """
  if not spec.trains:
    return 0
  search = config.quant.get("search_steps")
  return config.steps + (int(search) if spec.train_bits and search is not None else 0)
