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
import hashlib
import os
from typing import Any, Optional

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq import launch, workdir as wd
from baq.allocation import lm_importance, planner
from baq.models.lm.decoder import CausalLM
from baq.ptq import decoder as gd
from baq.quant import gptq, methods
from baq.quant.inject import QuantMode, QuantSpec, Quantizer
from baq.study.lm import exports
from baq.train import fit

METHODS = methods.Choices("LM study method", ("rtn", "gptq", "fair_gptq", "mixed"),
                          ("numerics",))
PROJECTIONS = r"block_\d+/(attn|mlp)/.*"
MAX_SEQUENCES = 64  # calibration sequences of the importance's LM loss
PAIR_CHUNKS = 4  # runs of similar length the importance's pair losses are scored in


def numeric_setting(name: str, model: CausalLM, params=None) -> tuple[CausalLM, dict]:
  """A runtime's numerics on every block projection: (the LM running them, info).

  The params stay the float model's. info's avg_bits is what the projections
  are stored in (`methods.stored_bits`: llama.cpp keeps rows that do not fill
  a k-quant's blocks in another type), and bits_per_weight adds the scales;
  without `params`, the numeric's nominal code bits.
  """
  methods.RUNTIMES.get(name)  # an unknown name lists the valid ones
  quant = Quantizer(rules=((PROJECTIONS, QuantSpec(numerics=name)),), mode=QuantMode.EVAL)
  if params is None:
    return CausalLM(model.config, quant), dict(method=name, avg_bits=methods.nominal_bits(name))
  flat = tu.flatten_dict(params, sep="/")
  shapes = [flat[f"{l}/kernel"].shape for l in gd.quantizable_layers(params,
                                                                       model.config.n_layers)]
  stored = methods.stored_bits(name, shapes)
  return CausalLM(model.config, quant), dict(method=name, avg_bits=stored["code_bits"],
                                             bits_per_weight=stored["bits_per_weight"])


def grid(config) -> str:
  """The GPTQ/RTN grid of the config (`gptq.GRIDS`; "full" where unset)."""
  g = str(config.quant.get("grid", "full"))
  if g not in gptq.GRIDS:
    raise ValueError(f"Unknown quant.grid {g!r}. Valid: {', '.join(gptq.GRIDS)}.")
  return g


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


def group_loss_fn(model, calib: Calibration, max_sequences: int = MAX_SEQUENCES):
  """params -> [1 + bias types]: the LM loss, then each type's pair loss.

  A pair loss is mean softplus(ll(a) - ll(b)) over that type's pairs, a
  being the stereotyped sentence (sent_more): the log-loss of preferring
  the stereotype, which rises as the model prefers it more.
  """
  ids = jnp.asarray(calib.tokens.ids[:max_sequences])
  lengths = jnp.asarray(calib.tokens.lengths[:max_sequences])
  a, b = calib.pairs
  types = sorted(set(calib.pair_bias_type.tolist()))
  chunks = _length_chunks(np.maximum(a.lengths, b.lengths))
  order = np.concatenate(chunks)
  onehot = jnp.asarray(np.stack([calib.pair_bias_type[order] == t for t in types]), jnp.float32)

  def trimmed(t: gd.Tokens, rows: np.ndarray) -> gd.Tokens:
    width = max(int(t.lengths[rows].max()), 2)
    return gd.Tokens(t.ids[rows, :width], t.lengths[rows])
  pieces = [(trimmed(a, rows), trimmed(b, rows)) for rows in chunks]

  def seq_ll(params, t: gd.Tokens):
    logits = model.apply({"params": params}, jnp.asarray(t.ids))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    tok = jnp.take_along_axis(logp, jnp.asarray(t.ids)[:, 1:, None], -1)[..., 0]
    mask = jnp.arange(1, t.ids.shape[1])[None] < jnp.asarray(t.lengths)[:, None]
    return jnp.sum(tok * mask, 1)

  def fn(params):
    lm = fit.lm_loss(model.apply({"params": params}, ids), ids, lengths)
    pair = jnp.concatenate([jax.nn.softplus(seq_ll(params, pa) - seq_ll(params, pb))
                            for pa, pb in pieces])
    return jnp.concatenate([lm[None], onehot @ pair / jnp.sum(onehot, 1)])

  return fn, ["lm"] + types


def _length_chunks(lengths: np.ndarray, chunks: int = PAIR_CHUNKS) -> list[np.ndarray]:
  """Row indices in `chunks` runs of similar length, shortest first.

  Each run is scored at its own longest row's width instead of the whole
  set's: sentences of a pair set vary from a few tokens to a hundred, so
  one padded batch spends most of its work on padding (the masked sums are
  the same either way).
  """
  order = np.argsort(np.asarray(lengths), kind="stable")
  return [r for r in np.array_split(order, min(chunks, len(order))) if len(r)]


def _digest(*trees) -> str:
  """A hash of arrays' shapes, dtypes and bytes (params, calibration) and of plain values."""
  h = hashlib.sha256()
  for tree in trees:
    leaves, treedef = jax.tree.flatten(tree)
    h.update(str(treedef).encode())
    for x in leaves:
      if isinstance(x, (str, int, float, bool)) or x is None:
        h.update(repr(x).encode())
      else:
        a = np.asarray(x)
        h.update(f"{a.shape}{a.dtype}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


class AnalysisCache:
  """The layer analysis of one seed, computed once and reused across budgets.

  The importance and sensitivity of every layer do not depend on the
  budget: the allocator reads them at each budget. They are keyed by what
  they do depend on (the float params, the calibration sequences and pairs,
  the measure, the candidate bits and the group size), kept in memory, and,
  given a seed directory, written to SEED_DIR/analysis/<key>.npz (process 0)
  so a resumed run reads them back. A file made from other inputs has
  another key, so it is never read for these.

  Args:
    seed_dir: where the files go; None keeps them in memory only.
  """

  def __init__(self, seed_dir: Optional[str] = None):
    self.seed_dir = seed_dir
    self._memo: dict[str, tuple[planner.Analysis, list]] = {}
    self.computed = 0  # analyses computed (not read) by this cache

  def get(self, key: str, compute) -> tuple[planner.Analysis, list]:
    """(analysis, group names) of `key`: memoised, else read, else `compute()` and kept."""
    if key in self._memo:
      return self._memo[key]
    file = wd.analysis_path(self.seed_dir, key) if self.seed_dir else None
    if file and os.path.isfile(file):
      with np.load(file, allow_pickle=False) as z:
        a = planner.Analysis([str(u) for u in z["units"]], z["numel"],
                             tuple(int(c) for c in z["choices"]), z["importance"],
                             z["sensitivity"], z["group_counts"], str(z["measure"]))
        self._memo[key] = (a, [str(g) for g in z["groups"]])
      return self._memo[key]
    a, groups = compute()
    self.computed += 1
    self._memo[key] = (a, groups)
    if file and launch.is_primary():
      os.makedirs(os.path.dirname(file), exist_ok=True)
      with open(file + ".tmp", "wb") as f:  # renamed when whole: a killed run leaves no half file
        np.savez(f, units=np.asarray(a.units), numel=a.numel, choices=np.asarray(a.choices),
                 importance=a.importance, sensitivity=a.sensitivity,
                 group_counts=a.group_counts, measure=np.asarray(a.measure),
                 groups=np.asarray(groups))
      os.replace(file + ".tmp", file)
    return self._memo[key]


def analysis(model, params, calib: Calibration, config, n_layers: int,
             cache: Optional[AnalysisCache] = None) -> tuple[planner.Analysis, list]:
  """The per-layer group-aware analysis of the float model (memoised in `cache`).

  Returns:
    (`planner.Analysis` with one unit per layer, group names).
  """
  q = config.quant
  layers = gd.quantizable_layers(params, n_layers)
  choices = [int(c) for c in _floats(q.choices)]

  def compute():
    loss, groups = group_loss_fn(model, calib)
    return lm_importance.analyse(loss, params, layers, measure=q.measure, choices=choices,
                                 group_size=q.group_size, grid=grid(config)), groups
  if cache is None:
    return compute()
  tokens = [calib.tokens] + list(calib.pairs or ())
  arrays = [a for t in tokens for a in (t.ids, t.lengths)] + [calib.pair_bias_type]
  key = _digest(params, arrays, [str(model.config), list(layers), q.measure, choices,
                                 q.group_size, MAX_SEQUENCES]
                 + [grid(config)])
  return cache.get(key, compute)


def allocation(model, params, calib: Calibration, config, budget: float, n_layers: int,
               modules=(), cache: Optional[AnalysisCache] = None):
  """Per-layer bits at `budget` from the group-aware importance, and what it used.

  Layers of one checkpoint module (`modules`: tuples of layers, e.g. GPT-2's
  fused q/k/v) are one unit with one bit-width. The analysis does not depend
  on the budget: pass one `cache` for every budget of a seed.
  """
  q = config.quant
  a, groups = analysis(model, params, calib, config, n_layers, cache)
  units = lm_importance.tie(a, modules)
  unit_bits = planner.allocate(units, budget, reducer=q.reducer)
  per_layer = {l: int(b) for u, b in zip(units.units, unit_bits) for l in u.split("+")}
  bits = np.asarray([per_layer[l] for l in a.units])
  numel = a.numel
  info = dict(groups=groups, bits=per_layer, units=units.units,
              avg_bits=float((numel * bits).sum() / numel.sum()))
  assert info["avg_bits"] <= budget + 1e-9, "the allocator exceeded the budget"
  return info["bits"], info


def quantize(name: str, model, params: Any, calib: Calibration, config,
             n_layers: int, modules=(), cache: Optional[AnalysisCache] = None
             ) -> tuple[Any, dict, dict]:
  """Runs one setting; (params, per-layer records, info). `modules`, `cache`: see `allocation`."""
  method, level, alpha = METHODS.parse(name)
  if method.kind == "numerics":
    raise ValueError(f"{name} is a runtime's numerics: run `numeric_model`, no quantize.")
  q = config.quant
  alpha = alpha if alpha is not None else (float(q.mixed_alpha) if method.name == "mixed"
                                           else 0.0)
  info = dict(method=method.name, alpha=alpha)
  if method.name == "mixed":
    bits, alloc = allocation(model, params, calib, config, level, n_layers, modules, cache)
    info.update(alloc)
  else:
    bits = int(level)
    info["avg_bits"] = float(bits)
  opts = gd.Options(method="rtn" if method.name == "rtn" else "gptq", alpha=alpha,
                    group_size=q.group_size, act_order=bool(q.act_order),
                    pair_rows=q.pair_rows, pair_norm=q.pair_norm,
                    scale_dtype=exports.scale_dtype(config), grid=grid(config))
  pairs = calib.pairs if alpha > 0 else None
  qparams, records = gd.quantize_decoder(model, {"params": params}, calib.tokens, bits=bits,
                                         pairs=pairs, options=opts)
  info["seconds"] = float(sum(records["_blocks"]["seconds"]))
  return qparams, records, info
