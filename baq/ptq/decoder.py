"""GPTQ and Fair-GPTQ over a causal language model, decoder block by decoder block.

As in GPTQ's own LLM code (and GPTQModel's "true sequential" order), the
calibration sequences enter block 0 as embeddings; within a block the linear
layers are quantized in the order the block computes them (q/k/v, then o,
then the MLP's gate/up, then down), each from inputs that the already
quantized layers before it produce; the block's quantized output is the next
block's input. Only one block's inputs are held at a time (`[n, t, d]` for
the calibration set, and the same for each side of the pairs). Fair-GPTQ's
pair term and the quantization of each group of projections are in
`decoder_group.py`.

The quantizer is baq's symmetric absmax grid (`baq.quant.gptq`), per output
channel or per group of input rows; the returned kernels equal codes x scale.
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import flax.traverse_util as tu
import jax
import numpy as np

from baq.models.lm import decoder
from baq.ptq.decoder_group import Options, Tokens, chunks, pair_mask, quantize_group, spans

# The order a decoder block computes its projections; layers in one tuple
# share their input and are quantized from the same statistics.
SEQUENTIAL = (("attn/q_proj", "attn/k_proj", "attn/v_proj"), ("attn/o_proj",),
              ("mlp/gate_proj", "mlp/up_proj"), ("mlp/down_proj",))


def layer_order(block_params: Mapping[str, Any]) -> list[tuple[str, ...]]:
  """SEQUENTIAL restricted to the projections a block has (GPT-2/OPT: no gate)."""
  flat = tu.flatten_dict(flax.core.unfreeze(block_params), sep="/")
  have = {k.rsplit("/", 1)[0] for k in flat if k.endswith("/kernel")}
  unknown = have - {p for g in SEQUENTIAL for p in g}
  if unknown:
    raise ValueError(f"Block layers {sorted(unknown)} are not in the sequential order "
                     f"{[p for g in SEQUENTIAL for p in g]}.")
  return [tuple(p for p in g if p in have) for g in SEQUENTIAL if any(p in have for p in g)]


@functools.lru_cache(maxsize=8)
def _block_runner(model: nn.Module):
  """jit(block_params, h, target) -> block output (target None) or `target`'s input.

  One program per model, target and input shape for every block (the
  block's params are an argument), kept for the next quantization of the
  same model (a study quantizes it once per setting); a capture pass returns
  only the captured input, so XLA drops the rest of the block.
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


def _embed(fn, variables, tokens: Tokens, batch_size: int) -> np.ndarray:
  return np.concatenate([np.asarray(fn(variables, tokens.ids[s]))
                         for s in chunks(len(tokens.ids), batch_size)])


def _by_length(a: Tokens, b: Optional[Tokens], batch_size: int):
  """The rows sorted by length (of the longer side, with pairs), and their `spans`.

  Every statistic is a sum over rows, so their order changes only the
  rounding; sorted, each chunk runs at its own rows' width.
  """
  lengths = a.lengths if b is None else np.maximum(a.lengths, b.lengths)
  order = np.argsort(lengths, kind="stable")
  sort = lambda t: Tokens(np.asarray(t.ids)[order], np.asarray(t.lengths)[order])
  rows = spans(np.asarray(lengths)[order], batch_size, np.shape(a.ids)[1])
  return (sort(a) if b is None else (sort(a), sort(b))), rows


def _forward(run, block, x: np.ndarray, rows) -> np.ndarray:
  """The block's output on x, chunk by chunk at each chunk's width (`spans`);
  the trailing padding stays 0 (nothing reads it)."""
  out = np.zeros_like(x)
  for s, w in rows:
    out[s, :w] = np.asarray(run(block, x[s, :w], None))
  return out


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
    for round to nearest), seconds, codes [d_in, d_out] and scales (the
    kernel is exactly codes x scales), and for GPTQ loss, damp; with pairs
    also pair_rows and pair_err (the same over the pair differences) on fair
    layers. records["_blocks"] lists each block's
    seconds.
  """
  if options.alpha > 0 and pairs is None:
    raise ValueError("Fair-GPTQ (alpha > 0) needs pairs=(a, b).")
  if pairs is not None and (pairs[0].ids.shape != pairs[1].ids.shape):
    raise ValueError(f"The two sides of the pairs must have one shape (same count, padded "
                     f"to one width), got {pairs[0].ids.shape} and {pairs[1].ids.shape}.")
  params = flax.core.unfreeze(variables["params"])
  n_layers = sum(1 for k in params if re.fullmatch(r"block_\d+", k))
  calib, rows = _by_length(calib, None, options.batch_size)
  lookup = _bits_lookup(bits, quantizable_layers(params, n_layers))
  flat = tu.flatten_dict(params, sep="/")
  bs = options.batch_size
  embed = jax.jit(lambda v, ids: model.apply(v, ids, method=type(model).embed))
  h = _embed(embed, {"params": params}, calib, bs)
  mask = calib.mask()
  pair_state = None
  if pairs is not None:
    (a, b), pair_rows = _by_length(*pairs, bs)
    pair_state = (_embed(embed, {"params": params}, a, bs),
                  _embed(embed, {"params": params}, b, bs),
                  pair_mask(a, b, options.pair_rows), pair_rows)
  records, block_seconds = {}, []
  run = _block_runner(model)
  for i in range(n_layers):
    t0 = time.perf_counter()
    for group in layer_order(params[f"block_{i}"]):
      records.update(quantize_group(run, flat, group, (h, mask, rows, pair_state), options,
                                     lookup, f"block_{i}"))
    quantized = tu.unflatten_dict(flat, sep="/")[f"block_{i}"]
    h = _forward(run, quantized, h, rows)  # the next block sees the quantized block
    if pair_state is not None:
      ha, hb, pmask, pair_rows = pair_state
      pair_state = (_forward(run, quantized, ha, pair_rows),
                    _forward(run, quantized, hb, pair_rows), pmask, pair_rows)
    block_seconds.append(time.perf_counter() - t0)
  records["_blocks"] = dict(seconds=block_seconds)
  return tu.unflatten_dict(flat, sep="/"), records
