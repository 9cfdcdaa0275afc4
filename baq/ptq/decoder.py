"""GPTQ and Fair-GPTQ over a causal language model, decoder block by decoder block.

As in GPTQ's own LLM code (and GPTQModel's "true sequential" order), the
calibration sequences enter block 0 as embeddings; within a block the linear
layers are quantized in the order the block computes them (q/k/v, then o,
then the MLP's gate/up, then down), each from inputs that the already
quantized layers before it produce; the block's quantized output is the next
block's input. Only one block's inputs are held at a time (`[n, t, d]` for
the calibration set, and the same for each side of the pairs).

Fair-GPTQ (the `upunaprosk/fair-gptq` patch of GPTQModel) adds a term from
paired sentences (a stereotype and its anti-stereotype, `x_a` and `x_b`):
each pair runs through the model side by side and, at each layer, the two
inputs are subtracted token by token, D = X_a - X_b, giving

  H_fair = H + alpha * H_pair,   H_pair = 2 D^T D / m.

Pairs of unequal length: positions are aligned from the first token, and
only positions both sentences have take part (`pair_rows="common"`, the
default: a padded position has no counterpart), or, as the reference does by
padding the pair to one length inside its batch of two, every position up to
the longer one with the shorter side's padding included (`"padded"`). The
normaliser m is the number of pairs (`pair_norm="pairs"`, as the reference's
running average over batches of one pair) or of difference rows
(`"rows"`, the per-row mean baq's vision Fair-GPTQ uses). `fair_update=
"hessian"` quantizes against H_fair; `"newton"` is the reference's
`gradient_update` option: one Newton step on the pair term before GPTQ,
W <- (I - H^-1 H_pair_alpha) W, then GPTQ against H.

The quantizer is baq's symmetric absmax grid (`baq.quant.gptq`), per output
channel or per group of input rows; the returned kernels equal codes x scale.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq.models.lm import decoder
from baq.quant import gptq, hessian

# The order a decoder block computes its projections; layers in one tuple
# share their input and are quantized from the same statistics.
SEQUENTIAL = (("attn/q_proj", "attn/k_proj", "attn/v_proj"), ("attn/o_proj",),
              ("mlp/gate_proj", "mlp/up_proj"), ("mlp/down_proj",))
METHODS = ("gptq", "rtn")
PAIR_ROWS = ("common", "padded")
PAIR_NORMS = ("pairs", "rows")
FAIR_UPDATES = ("hessian", "newton")


@dataclasses.dataclass(frozen=True)
class Tokens:
  """Right-padded token ids and their lengths.

  Attributes:
    ids: int32 [n, t].
    lengths: int32 [n], real tokens of each row (the rest is padding).
  """
  ids: np.ndarray
  lengths: np.ndarray

  def __post_init__(self):
    if np.ndim(self.ids) != 2 or np.shape(self.lengths) != (np.shape(self.ids)[0],):
      raise ValueError(f"Tokens need ids [n, t] and lengths [n], got {np.shape(self.ids)} "
                       f"and {np.shape(self.lengths)}.")
    if np.any(np.asarray(self.lengths) < 1) or np.any(np.asarray(self.lengths) >
                                                        np.shape(self.ids)[1]):
      raise ValueError(f"Every length must be in [1, {np.shape(self.ids)[1]}].")

  def mask(self) -> np.ndarray:
    return np.arange(self.ids.shape[1])[None, :] < np.asarray(self.lengths)[:, None]


@dataclasses.dataclass(frozen=True)
class Options:
  """How the decoder is quantized (see the module docstring).

  Attributes:
    method: "gptq" or "rtn" (round to nearest on the same grid; the baseline).
    alpha: weight of the pair term (0: plain GPTQ, bit for bit).
    fair_layers: regexes (re.fullmatch on "block_<i>/attn/q_proj"...) of the
      layers that get the pair term; all of them by default.
    float_layers: regexes of layers kept in float.
    group_size: rows per scale group (None: one scale per output channel).
    act_order: quantize rows by decreasing Hessian diagonal.
    block_size: GPTQ's lazy-update block.
    percdamp: damping, a fraction of the mean Hessian diagonal.
    pair_rows: "common" or "padded".
    pair_norm: "pairs" or "rows".
    fair_update: "hessian" or "newton".
    batch_size: sequences per forward pass.
  """
  method: str = "gptq"
  alpha: float = 0.0
  fair_layers: Sequence[str] = (r".*",)
  float_layers: Sequence[str] = ()
  group_size: Optional[int] = None
  act_order: bool = False
  block_size: int = 128
  percdamp: float = 0.01
  pair_rows: str = "common"
  pair_norm: str = "pairs"
  fair_update: str = "hessian"
  batch_size: int = 64

  def __post_init__(self):
    for field, valid in (("method", METHODS), ("pair_rows", PAIR_ROWS),
                         ("pair_norm", PAIR_NORMS), ("fair_update", FAIR_UPDATES)):
      if getattr(self, field) not in valid:
        raise ValueError(f"Unknown {field} {getattr(self, field)!r}. Valid: {', '.join(valid)}.")
    if not (np.isfinite(self.alpha) and self.alpha >= 0):
      raise ValueError(f"alpha must be finite and >= 0, got {self.alpha}.")
    if self.group_size is not None and self.group_size < 1:
      raise ValueError(f"group_size must be None or >= 1, got {self.group_size}.")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")


def _matches(path: str, patterns: Sequence[str]) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


def layer_order(block_params: Mapping[str, Any]) -> list[tuple[str, ...]]:
  """SEQUENTIAL restricted to the projections a block has (GPT-2/OPT: no gate)."""
  flat = tu.flatten_dict(flax.core.unfreeze(block_params), sep="/")
  have = {k.rsplit("/", 1)[0] for k in flat if k.endswith("/kernel")}
  unknown = have - {p for g in SEQUENTIAL for p in g}
  if unknown:
    raise ValueError(f"Block layers {sorted(unknown)} are not in the sequential order "
                     f"{[p for g in SEQUENTIAL for p in g]}.")
  return [tuple(p for p in g if p in have) for g in SEQUENTIAL if any(p in have for p in g)]


def _block_runner(model: nn.Module):
  """jit(block_params, h, target) -> block output (target None) or `target`'s input.

  One program per model and target for every block (the block's params are
  an argument); a capture pass returns only the captured input, so XLA drops
  the rest of the block.
  """

  def run(block_params, h, target):
    captured = []

    def intercept(next_fun, args, kwargs, context):
      if (context.method_name == "__call__" and isinstance(context.module, nn.Dense)
          and "/".join(context.module.path) == target):
        captured.append(args[0] if args else kwargs["inputs"])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(intercept):
      out = decoder.apply_block(model.config, block_params, h)
    return out if target is None else captured[0]

  return jax.jit(run, static_argnums=2)


@jax.jit
def _masked_gram(x, mask):
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  m = mask.reshape(-1, 1).astype(jnp.float32)
  return (x * m).T @ x, jnp.sum(m)


def _pair_mask(a: Tokens, b: Tokens, rows: str) -> np.ndarray:
  t = a.ids.shape[1]
  la, lb = np.asarray(a.lengths), np.asarray(b.lengths)
  n = np.minimum(la, lb) if rows == "common" else np.maximum(la, lb)
  return np.arange(t)[None, :] < n[:, None]


def _chunks(n: int, size: int):
  return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _embed(fn, variables, tokens: Tokens, batch_size: int) -> np.ndarray:
  return np.concatenate([np.asarray(fn(variables, tokens.ids[s]))
                         for s in _chunks(len(tokens.ids), batch_size)])


def _grams(run, params, h, mask, target, batch_size, h_b=None):
  """Sum of masked x x^T of `target`'s input over h's chunks (of x_a - x_b with h_b)."""
  xtx, n = 0.0, 0.0
  for s in _chunks(len(h), batch_size):
    x = run(params, h[s], target)
    if h_b is not None:
      x = x - run(params, h_b[s], target)
    g, c = _masked_gram(x, mask[s])
    xtx, n = xtx + g, n + float(c)
  return np.asarray(xtx, np.float64), n


def _quantize_kernel(w, bits, h, h_pair, opts: Options, name: str):
  """One kernel: (W_q, GPTQResult or None) against h (and the weighted pair term)."""
  if opts.method == "rtn":
    return np.asarray(gptq.rtn(w, bits, opts.group_size)), None
  target = h
  if h_pair is not None and opts.fair_update == "hessian":
    target = hessian.fair_hessian(h, h_pair, opts.alpha)
  elif h_pair is not None:  # newton: W <- W - (H + damp)^-1 (alpha H_pair) W, then GPTQ on H
    damp = opts.percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    w = w - np.linalg.solve(h + damp, opts.alpha * h_pair @ w)
  r = gptq.gptq(jnp.asarray(w, jnp.float32), jnp.asarray(target, jnp.float32), bits,
                block_size=opts.block_size, group_size=opts.group_size,
                act_order=opts.act_order, percdamp=opts.percdamp, name=name)
  return np.asarray(r.weight), r


def _record(w, w_q, bits, opts, xtx, n, dtd, m, r, seconds):
  err = gptq.output_error(xtx, w, w_q) / n
  if opts.method != "rtn":  # with RTN, w_q is round to nearest's kernel already
    err_rtn = gptq.output_error(xtx, w, np.asarray(gptq.rtn(w, bits, opts.group_size))) / n
  rec = dict(bits=int(bits), rows=int(n), seconds=seconds, method=opts.method, err=err,
             err_rtn=err if opts.method == "rtn" else err_rtn)
  if dtd is not None:
    rec.update(fair=opts.alpha > 0, pair_rows=int(m),
               pair_err=gptq.output_error(dtd, w, w_q) / m)
  if r is not None:
    rec.update(codes=np.asarray(r.codes), scales=np.asarray(r.scales), loss=r.loss,
               damp=r.damp)
  return rec


def _quantize_group(run, flat, group, states, opts, bits, prefix):
  """Quantizes one group of a block's layers in `flat` (the model's params, flattened
  with "/"); returns their records."""
  h, mask, pairs = states
  names = [f"{prefix}/{layer}" for layer in group]
  params = tu.unflatten_dict(flat, sep="/")[prefix]
  xtx, n = _grams(run, params, h, mask, group[0], opts.batch_size)
  h_full = np.asarray(hessian.hessian(hessian.HessianStats(xtx, n)))
  dtd, h_pair, rows = None, None, 0
  if pairs is not None and any(_matches(nm, opts.fair_layers) for nm in names):
    ha, hb, pmask = pairs
    dtd, rows = _grams(run, params, ha, pmask, group[0], opts.batch_size, h_b=hb)
    h_pair = 2.0 * dtd / max(len(ha) if opts.pair_norm == "pairs" else rows, 1)
  records = {}
  for name in names:
    if _matches(name, opts.float_layers):
      continue
    t0 = time.perf_counter()
    key = f"{name}/kernel"
    w = np.asarray(flat[key], np.float64)
    b = bits(name)
    fair = dtd is not None and _matches(name, opts.fair_layers)
    w_q, r = _quantize_kernel(w, b, h_full, h_pair if fair else None, opts, name)
    flat[key] = jnp.asarray(w_q, flat[key].dtype)
    records[name] = _record(w, w_q, b, opts, xtx, n, dtd if fair else None, rows, r,
                            time.perf_counter() - t0)
  return records


def _bits_lookup(bits: Union[int, Mapping[str, int]], layers: Sequence[str]):
  """name -> integer bits, refusing names that are not layers and bits outside 2..8."""
  if isinstance(bits, Mapping):
    unknown = sorted(set(bits) - set(layers))
    if unknown:
      raise ValueError(f"bits name unknown layers {unknown}; layers: {list(layers)}.")
    missing = sorted(set(layers) - set(bits))
    if missing:
      raise ValueError(f"bits has no entry for {missing}.")
    table = dict(bits)
  else:
    table = {name: bits for name in layers}
  for name, b in table.items():
    if int(b) != b or not 2 <= b <= 8:
      raise ValueError(f"bits of {name} must be an integer in [2, 8], got {b}.")
  return lambda name: int(table[name])


def quantizable_layers(params: Mapping[str, Any], n_layers: int) -> list[str]:
  """Every projection of every block, in the order `quantize_decoder` visits them."""
  out = []
  for i in range(n_layers):
    out += [f"block_{i}/{p}" for g in layer_order(params[f"block_{i}"]) for p in g]
  return out


# Over 60 lines by its docstring; the body is the block loop.
def quantize_decoder(model: nn.Module, variables: Any, calib: Tokens, *,
                     bits: Union[int, Mapping[str, int]] = 4,
                     pairs: Optional[tuple[Tokens, Tokens]] = None,
                     options: Options = Options()) -> tuple[Any, dict[str, dict]]:
  """Quantizes every block projection of a float causal LM, block by block.

  Args:
    model: the float `baq.models.lm.CausalLM` (quantizer None), which has
      `embed(tokens)`; its blocks run through `decoder.apply_block`.
    variables: its {"params": ...}.
    calib: calibration sequences (right padded; padding rows are left out of
      every statistic).
    bits: one bit-width, or {"block_<i>/<attn|mlp>/<proj>": bits} for every
      layer (a mixed-precision allocation; `quantizable_layers` lists them).
    pairs: (a, b) aligned paired sentences for Fair-GPTQ (same count and
      padded width); needed when options.alpha > 0.
    options: see `Options`.

  Returns:
    (params, records): the float tree with quantized kernels (embeddings,
    norms and the head untouched), and per layer a dict with bits, rows, err
    (||X (W - W_q)||^2 / rows on its calibration inputs), err_rtn (the same
    for round to nearest), seconds, and for GPTQ codes [d_in, d_out], scales,
    loss, damp; with pairs also pair_rows and pair_err (the same over the
    pair differences) on fair layers. records["_blocks"] lists each block's
    seconds.
  """
  if options.alpha > 0 and pairs is None:
    raise ValueError("Fair-GPTQ (alpha > 0) needs pairs=(a, b).")
  if pairs is not None and (pairs[0].ids.shape != pairs[1].ids.shape):
    raise ValueError(f"The two sides of the pairs must have one shape (same count, padded "
                     f"to one width), got {pairs[0].ids.shape} and {pairs[1].ids.shape}.")
  params = flax.core.unfreeze(variables["params"])
  n_layers = sum(1 for k in params if re.fullmatch(r"block_\d+", k))
  lookup = _bits_lookup(bits, quantizable_layers(params, n_layers))
  flat = tu.flatten_dict(params, sep="/")
  bs = options.batch_size
  embed = jax.jit(lambda v, ids: model.apply(v, ids, method=type(model).embed))
  h = _embed(embed, {"params": params}, calib, bs)
  mask = calib.mask()
  pair_state = None
  if pairs is not None:
    pair_state = (_embed(embed, {"params": params}, pairs[0], bs),
                  _embed(embed, {"params": params}, pairs[1], bs),
                  _pair_mask(pairs[0], pairs[1], options.pair_rows))
  records, block_seconds = {}, []
  run = _block_runner(model)
  for i in range(n_layers):
    t0 = time.perf_counter()
    for group in layer_order(params[f"block_{i}"]):
      records.update(_quantize_group(run, flat, group, (h, mask, pair_state), options,
                                     lookup, f"block_{i}"))
    quantized = tu.unflatten_dict(flat, sep="/")[f"block_{i}"]
    forward = lambda x: np.concatenate(  # pylint: disable=cell-var-from-loop
        [np.asarray(run(quantized, x[s], None)) for s in _chunks(len(x), bs)])
    h = forward(h)  # the next block sees this block's quantized output
    if pair_state is not None:
      pair_state = (forward(pair_state[0]), forward(pair_state[1]), pair_state[2])
    block_seconds.append(time.perf_counter() - t0)
  records["_blocks"] = dict(seconds=block_seconds)
  return tu.unflatten_dict(flat, sep="/"), records
