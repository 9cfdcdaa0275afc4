"""Fair-GPTQ of one group of a decoder block's projections (`decoder.py` runs the blocks).

A group is the projections that share one input (q/k/v; o; gate/up; down).
Its statistics are the Gram matrix of that input over the calibration
sequences and, for Fair-GPTQ, of the paired sentences' input differences;
each kernel is then quantized against them and recorded.

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
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Optional, Sequence

import flax.traverse_util as tu
import jax
import jax.numpy as jnp
import numpy as np

from baq.quant import gptq, hessian

METHODS = ("gptq", "rtn")
PAIR_ROWS = ("common", "padded")
PAIR_NORMS = ("pairs", "rows")
FAIR_UPDATES = ("hessian", "newton")
WIDTH_BUCKET = 32  # chunk widths are multiples of this: few programs compile (`spans`)


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
  """How the decoder is quantized (see this and `decoder.py`'s module docstrings).

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
    scale_dtype: "float32", or "float16" for scales that formats storing
      fp16 scales (GGUF, GPTQ) hold exactly (`gptq.SCALE_DTYPES`).
    grid: "full" (GPTQ's 2^b levels, as GPTQModel and the reference quantize)
      or "restricted" (baq's symmetric 2^b - 1, fake_quant's; `gptq.GRIDS`).
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
  scale_dtype: str = "float32"
  grid: str = "full"

  def __post_init__(self):
    for field, valid in (("method", METHODS), ("pair_rows", PAIR_ROWS),
                         ("pair_norm", PAIR_NORMS), ("fair_update", FAIR_UPDATES),
                         ("scale_dtype", gptq.SCALE_DTYPES), ("grid", gptq.GRIDS)):
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


@jax.jit
def _masked_gram(x, mask):
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  m = mask.reshape(-1, 1).astype(jnp.float32)
  return (x * m).T @ x, jnp.sum(m)


def pair_mask(a: Tokens, b: Tokens, rows: str) -> np.ndarray:
  """bool [n, t]: the positions whose differences count (`Options.pair_rows`).

  Args:
    a: one side of the pairs.
    b: the other side, of a's shape.
    rows: "common" (positions both sides have) or "padded" (up to the longer).
  """
  t = a.ids.shape[1]
  la, lb = np.asarray(a.lengths), np.asarray(b.lengths)
  n = np.minimum(la, lb) if rows == "common" else np.maximum(la, lb)
  return np.arange(t)[None, :] < n[:, None]


def chunks(n: int, size: int) -> list[slice]:
  # Every forward pass and every statistic walks the rows in these batches.
  return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def spans(lengths: np.ndarray, size: int, width: int, bucket: Optional[int] = None
          ) -> list[tuple[slice, int]]:
  """(rows, width) of each chunk of `size` rows: the chunk's longest row rounded up
  to a multiple of `bucket` (default `WIDTH_BUCKET`), at most `width`.

  Rows sorted by length (`decoder.quantize_decoder` sorts them) make chunks of
  like lengths, so a chunk of short sentences runs at their width instead of
  the longest one's: a causal block's outputs at a position do not depend on
  the positions after it, and every statistic is masked, so the trailing
  padding cut off changes nothing but the work (Fair-GPTQ's pairs are mostly
  padding: CrowS-Pairs and StereoSet sentences run from 10 to 110 tokens).
  """
  bucket, out = bucket or WIDTH_BUCKET, []
  for s in chunks(len(lengths), size):
    longest = int(np.max(lengths[s], initial=1))
    out.append((s, int(min(width, max(bucket, -(-longest // bucket) * bucket)))))
  return out


def _grams(run, params, h, mask, target, rows, h_b=None):
  """Sum of masked x x^T of `target`'s input over h's chunks `rows` (`spans`)
  (of x_a - x_b with h_b)."""
  xtx, n = 0.0, 0.0
  for s, w in rows:
    x = run(params, h[s, :w], target)
    if h_b is not None:
      x = x - run(params, h_b[s, :w], target)
    g, c = _masked_gram(x, mask[s, :w])
    xtx, n = xtx + g, n + float(c)
  return np.asarray(xtx, np.float64), n


def _quantize_kernel(w, bits, h, h_pair, opts: Options, name: str):
  """One kernel: (W_q, GPTQResult) against h (and the weighted pair term)."""
  if opts.method == "rtn":
    r = gptq.round_to_nearest(w, bits, opts.group_size, opts.scale_dtype, opts.grid)
    return np.asarray(r.weight), r
  target = h
  if h_pair is not None and opts.fair_update == "hessian":
    target = hessian.fair_hessian(h, h_pair, opts.alpha)
  elif h_pair is not None:  # newton: W <- W - (H + damp)^-1 (alpha H_pair) W, then GPTQ on H
    damp = opts.percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    w = w - np.linalg.solve(h + damp, opts.alpha * h_pair @ w)
  r = gptq.gptq(jnp.asarray(w, jnp.float32), jnp.asarray(target, jnp.float32), bits,
                block_size=opts.block_size, group_size=opts.group_size,
                act_order=opts.act_order, percdamp=opts.percdamp, name=name,
                scale_dtype=opts.scale_dtype, grid=opts.grid)
  return np.asarray(r.weight), r


def _record(w, w_q, bits, opts, xtx, n, dtd, m, r, seconds):
  err = gptq.output_error(xtx, w, w_q) / n
  if opts.method != "rtn":  # with RTN, w_q is round to nearest's kernel already
    w_rtn = gptq.rtn(w, bits, opts.group_size, opts.scale_dtype, opts.grid)
    err_rtn = gptq.output_error(xtx, w, np.asarray(w_rtn)) / n
  rec = dict(bits=int(bits), rows=int(n), seconds=seconds, method=opts.method, err=err,
             err_rtn=err if opts.method == "rtn" else err_rtn)
  if dtd is not None:
    rec.update(fair=opts.alpha > 0, pair_rows=int(m),
               pair_err=gptq.output_error(dtd, w, w_q) / m)
  rec.update(codes=np.asarray(r.codes), scales=np.asarray(r.scales))
  if opts.method != "rtn":
    rec.update(loss=r.loss, damp=r.damp)
  return rec


def quantize_group(run, flat, group, states, opts: Options, bits, prefix: str) -> dict:
  """Quantizes one group of a block's projections in place, in `flat`.

  Args:
    run: jit(block_params, h, target) -> `target`'s input (decoder's block runner).
    flat: the model's params flattened with "/"; the group's kernels are replaced.
    group: the projections sharing one input ("attn/q_proj", ...).
    states: (h [n, t, d], mask [n, t], rows, pairs) with pairs None or
      (h_a, h_b, pair_mask, pair_rows): the block's inputs, each walked in
      its `spans` (rows).
    opts: the `Options`.
    bits: name -> integer bit-width.
    prefix: the block's name, "block_<i>".

  Returns:
    layer name -> record (see `quantize_decoder`), float layers left out.
  """
  h, mask, rows_h, pairs = states
  names = [f"{prefix}/{layer}" for layer in group]
  params = tu.unflatten_dict(flat, sep="/")[prefix]
  xtx, n = _grams(run, params, h, mask, group[0], rows_h)
  h_full = np.asarray(hessian.hessian(hessian.HessianStats(xtx, n)))
  dtd, h_pair, rows = None, None, 0
  if pairs is not None and any(_matches(nm, opts.fair_layers) for nm in names):
    ha, hb, pmask, rows_pairs = pairs
    dtd, rows = _grams(run, params, ha, pmask, group[0], rows_pairs, h_b=hb)
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
