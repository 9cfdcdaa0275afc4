"""The quantized settings of the LM study: RTN, GPTQ, Fair-GPTQ and mixed precision.

A setting is named `<method>@<bits or budget>[:a<alpha>]`:
  rtn@4            round to nearest on GPTQ's grid, every block projection
  gptq@4           GPTQ, block by block (`baq.ptq.decoder`)
  fair_gptq@4:a0.1 Fair-GPTQ with pair weight 0.1
  llm_int8, nf4, dynamic_int8
                   the runtimes' numerics (`baq.quant.numerics`, from
                   `quant.numerics`) on every block projection, as
                   bitsandbytes and torch compute them (no calibration)
  mixed@3          group-aware mixed precision at 3.0 average bits: layer
                   importance from the LM loss and each bias type's pair loss
                   (`baq.allocation.lm_importance`), the config's reducer, the
                   exact allocator, then GPTQ (Fair-GPTQ when
                   quant.mixed_alpha > 0) at the allocated bits
The grammar, the kinds and the nominal bits are `baq.quant.methods`' (`METHODS`
is the subset this study runs: these four by name and every method of kind
"numerics"); `settings(config)` lists them and `quantize(name, ...)` runs one
(`numeric_setting` a runtime's numerics).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from baq.allocation import lm_importance, planner
from baq.models.lm.decoder import CausalLM
from baq.ptq import decoder as gd
from baq.quant import methods
from baq.quant.inject import QuantMode, QuantSpec, Quantizer
from baq.study.lm import exports
from baq.train import fit

METHODS = methods.Choices("LM study method", ("rtn", "gptq", "fair_gptq", "mixed"),
                          ("numerics",))
PROJECTIONS = r"block_\d+/(attn|mlp)/.*"


def numeric_setting(name: str, model: CausalLM) -> tuple[CausalLM, dict]:
  """A runtime's numerics on every block projection: (the LM running them, info).

  The params stay the float model's; info's avg_bits is the numeric's code
  bits (`methods.nominal_bits`, from its storage).
  """
  methods.RUNTIMES.get(name)  # an unknown name lists the valid ones
  quant = Quantizer(rules=((PROJECTIONS, QuantSpec(numerics=name)),), mode=QuantMode.EVAL)
  return CausalLM(model.config, quant), dict(method=name, avg_bits=methods.nominal_bits(name))


def _floats(text: str) -> list[float]:
  return [float(x) for x in str(text).split(",") if x.strip()]


def settings(config) -> list[str]:
  """Every quantized setting of the config, in the order they are run and reported."""
  q = config.quant
  choices = [int(c) for c in _floats(q.choices)]
  bad = [c for c in choices if c not in (2, 3, 4, 8)]
  if bad:
    raise ValueError(f"quant.choices {bad} cannot be held by a GPTQ checkpoint; use 2, 3, 4, 8.")
  out = []
  for a in _floats(q.alphas) + [q.mixed_alpha]:
    if not (np.isfinite(a) and a >= 0):
      raise ValueError(f"Fair-GPTQ alpha {a} must be finite and >= 0.")
  for b in _floats(q.bits):  # a bit-width outside rtn's bounds raises, naming them
    out += [methods.format("rtn", b), methods.format("gptq", b)]
    out += [methods.format("fair_gptq", b, a) for a in _floats(q.alphas)]
  for budget in _floats(q.budgets):
    if not min(choices) <= budget <= max(choices):
      raise ValueError(f"quant.budgets holds {budget}, outside the allowed bits "
                       f"[{min(choices)}, {max(choices)}] of quant.choices.")
    out.append(methods.format("mixed", budget))
  for name in [n.strip() for n in str(q.get("numerics", "")).split(",") if n.strip()]:
    out.append(methods.format(methods.RUNTIMES.get(name)))  # unknown: the valid ones listed
  return out


@dataclasses.dataclass
class Calibration:
  """What quantization sees.

  Attributes:
    tokens: calibration sequences.
    pairs: (a, b) aligned calibration pairs (same width), or None.
    pair_bias_type: [m] bias type of each pair.
  """
  tokens: gd.Tokens
  pairs: Optional[tuple[gd.Tokens, gd.Tokens]]
  pair_bias_type: np.ndarray


def group_loss_fn(model, calib: Calibration, max_sequences: int = 64):
  """params -> [1 + bias types]: the LM loss, then each type's pair loss.

  A pair loss is mean softplus(ll(a) - ll(b)) over that type's pairs, a
  being the stereotyped sentence (sent_more): the log-loss of preferring
  the stereotype, which rises as the model prefers it more.
  """
  ids = jnp.asarray(calib.tokens.ids[:max_sequences])
  lengths = jnp.asarray(calib.tokens.lengths[:max_sequences])
  a, b = calib.pairs
  types = sorted(set(calib.pair_bias_type.tolist()))
  onehot = jnp.asarray(np.stack([calib.pair_bias_type == t for t in types]), jnp.float32)

  def seq_ll(params, t: gd.Tokens):
    logits = model.apply({"params": params}, jnp.asarray(t.ids))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tok = jnp.take_along_axis(logp, jnp.asarray(t.ids)[:, 1:, None], -1)[..., 0]
    mask = jnp.arange(1, t.ids.shape[1])[None] < jnp.asarray(t.lengths)[:, None]
    return jnp.sum(tok * mask, 1)

  def fn(params):
    lm = fit.lm_loss(model.apply({"params": params}, ids), ids, lengths)
    pair = jax.nn.softplus(seq_ll(params, a) - seq_ll(params, b))
    return jnp.concatenate([lm[None], onehot @ pair / jnp.sum(onehot, 1)])

  return fn, ["lm"] + types


def allocation(model, params, calib: Calibration, config, budget: float, n_layers: int,
               modules=()):
  """Per-layer bits at `budget` from the group-aware importance, and what it used.

  Layers of one checkpoint module (`modules`: tuples of layers, e.g. GPT-2's
  fused q/k/v) are one unit with one bit-width.
  """
  q = config.quant
  layers = gd.quantizable_layers(params, n_layers)
  loss, groups = group_loss_fn(model, calib)
  analysis = lm_importance.analyse(loss, params, layers, measure=q.measure,
                                   choices=[int(c) for c in _floats(q.choices)],
                                   group_size=q.group_size)
  units = lm_importance.tie(analysis, modules)
  unit_bits = planner.allocate(units, budget, reducer=q.reducer)
  per_layer = {l: int(b) for u, b in zip(units.units, unit_bits) for l in u.split("+")}
  bits = np.asarray([per_layer[l] for l in layers])
  numel = analysis.numel
  info = dict(groups=groups, bits=per_layer, units=units.units,
              avg_bits=float((numel * bits).sum() / numel.sum()))
  assert info["avg_bits"] <= budget + 1e-9, "the allocator exceeded the budget"
  return info["bits"], info


def quantize(name: str, model, params: Any, calib: Calibration, config,
             n_layers: int, modules=()) -> tuple[Any, dict, dict]:
  """Runs one setting; (params, per-layer records, info). `modules`: see `allocation`."""
  method, level, alpha = METHODS.parse(name)
  if method.kind == "numerics":
    raise ValueError(f"{name} is a runtime's numerics: run `numeric_model`, no quantize.")
  q = config.quant
  alpha = alpha if alpha is not None else (float(q.mixed_alpha) if method.name == "mixed"
                                           else 0.0)
  info = dict(method=method.name, alpha=alpha)
  if method.name == "mixed":
    bits, alloc = allocation(model, params, calib, config, level, n_layers, modules)
    info.update(alloc)
  else:
    bits = int(level)
    info["avg_bits"] = float(bits)
  opts = gd.Options(method="rtn" if method.name == "rtn" else "gptq", alpha=alpha,
                    group_size=q.group_size, act_order=bool(q.act_order),
                    pair_rows=q.pair_rows, pair_norm=q.pair_norm,
                    scale_dtype=exports.scale_dtype(config))
  pairs = calib.pairs if alpha > 0 else None
  qparams, records = gd.quantize_decoder(model, {"params": params}, calib.tokens, bits=bits,
                                         pairs=pairs, options=opts)
  info["seconds"] = float(sum(records["_blocks"]["seconds"]))
  return qparams, records, info
