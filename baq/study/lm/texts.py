"""The LM study's text: what it reads, and how text becomes token sequences.

`load_texts` reads (or, for the synthetic data, first writes) the study's
files: the calibration text, one or two perplexity texts, CrowS-Pairs,
StereoSet and, optionally, calibration pairs. `data.text_unit` says how a
text becomes sequences of at most `data.max_len` tokens:

  "line"    every line is one sequence (cut at max_len): the synthetic
            corpus's sentences, and the calibration sample is
            `quant.calib_sequences` lines drawn by the seed;
  "window"  every line (a story, an article) is tokenised whole and cut
            into consecutive windows of max_len tokens, each window's first
            token being context only, so every token after a line's <bos> is
            scored once (`heldout_windows`; at most `data.heldout_tokens`
            scored tokens per text); the calibration sample is
            `quant.calib_sequences` windows of max_len - 1 tokens at
            positions drawn by the seed from the whole calibration text,
            each after <bos>, as GPTQ samples its calibration windows.

For a pre-trained model the seed varies the calibration sample only (and
the bootstrap's resampling); for a model trained in the run it varies the
model too.
"""

from __future__ import annotations

import os

import numpy as np

from baq import launch
from baq.data.text import crows_pairs, stereoset as stereoset_data, synthetic, tokenizer as tok
from baq.ptq import decoder as gd
from baq.study.lm import quant as lm_quant
from baq import workdir as wd

TEXT_UNITS = ("line", "window")


def _read_lines(path: str, what: str) -> list[str]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: no file {path!r}.")
  with open(path) as f:
    return [l.strip() for l in f if l.strip()]


def load_texts(config, root: str) -> dict:
  """The study's text.

  Returns:
    dict(train: calibration (or training) lines, heldout: {name: lines} of the
    perplexity texts, in-domain first, crows, stereoset (or None), pairs (or None)).
  """
  d = config.data
  if d.kind == "synthetic":
    folder = wd.path(root, wd.STUDY_DATA_DIR)

    def make():  # once, by process 0; the others read what it wrote
      if not os.path.isfile(os.path.join(folder, "README")):
        synthetic.write(folder, synthetic.generate(d.seed, association=d.association,
                                                   num_train=d.num_train,
                                                   num_heldout=d.num_heldout))
    launch.primary_first(make, "baq: LM corpus written")
    files = dict(train=os.path.join(folder, "train.txt"),
                 heldout=os.path.join(folder, "heldout.txt"),
                 crows=os.path.join(folder, "crows_pairs_anonymized.csv"),
                 pairs=os.path.join(folder, "calibration_pairs.csv"),
                 stereoset=os.path.join(folder, "dev.json"), heldout_ood="")
  elif d.kind == "files":
    files = dict(train=d.calibration or d.heldout, heldout=d.heldout, crows=d.crows_pairs,
                 pairs=d.get("calibration_pairs", "") or "", stereoset=d.stereoset,
                 heldout_ood=d.get("heldout_ood", "") or "")
  else:
    raise ValueError(f"Unknown data.kind {d.kind!r}. Valid: synthetic, files.")
  heldout = {"heldout": _read_lines(files["heldout"], "held-out text")}
  if files["heldout_ood"]:
    heldout["heldout_ood"] = _read_lines(files["heldout_ood"], "out-of-domain held-out text")
  out = dict(train=_read_lines(files["train"], "training / calibration text"),
             heldout=heldout, crows=crows_pairs.load_crows_pairs(files["crows"]),
             stereoset=(stereoset_data.load_stereoset(files["stereoset"])
                        if files["stereoset"] else None))
  out["pairs"] = crows_pairs.load_crows_pairs(files["pairs"]) if files["pairs"] else None
  return out


def text_unit(config) -> str:
  """`data.text_unit`, checked."""
  unit = config.data.get("text_unit", "line")
  if unit not in TEXT_UNITS:
    raise ValueError(f"Unknown data.text_unit {unit!r}. Valid: {', '.join(TEXT_UNITS)}.")
  return unit


def _trim(ids: np.ndarray, lengths: np.ndarray) -> gd.Tokens:
  """Cuts the padding columns no row uses (a causal model scores the rest alike)."""
  return gd.Tokens(ids[:, :max(int(np.max(lengths, initial=1)), 1)], lengths)


def _stream(tokenizer, lines: list[str]) -> np.ndarray:
  """Every line's ids (no <bos>/<eos>), one after another."""
  encoded = tokenizer.encode_batch(list(lines), add_special_tokens=False)
  return np.asarray([i for e in encoded for i in e.ids], np.int32)


def heldout_windows(tokenizer, lines: list[str], max_len: int, max_tokens: int = 0,
                    pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Consecutive windows of each line's <bos> ids <eos>, overlapping by one token.

  Window k of a line holds its tokens k (max_len - 1) .. k (max_len - 1) +
  max_len - 1; only its first token is not scored, so every token after
  <bos> is scored exactly once, with the context of its own window.

  Args:
    tokenizer: the model's tokenizer (it needs <bos>).
    lines: the text, one document per line.
    max_len: tokens per window (>= 2).
    max_tokens: stop once this many tokens are scored (0: the whole text).
    pad_id: the padding id.

  Returns:
    (ids int32 [n, max_len], lengths int32 [n]).
  """
  if max_len < 2:
    raise ValueError(f"data.max_len={max_len} must be >= 2 for windows.")
  ids = tok.special_ids(tokenizer)
  rows, scored = [], 0
  for e in tokenizer.encode_batch(list(lines), add_special_tokens=False):
    seq = [ids["bos"]] + e.ids + ([] if ids["eos"] is None else [ids["eos"]])
    for start in range(0, max(len(seq) - 1, 1), max_len - 1):
      rows.append(seq[start:start + max_len])
      scored += len(rows[-1]) - 1
      if max_tokens and scored >= max_tokens:
        break
    if max_tokens and scored >= max_tokens:
      break
  out = np.full((len(rows), max_len), pad_id, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, np.asarray([len(r) for r in rows], np.int32)


def calibration(config, texts: dict, tokenizer, seed: int) -> lm_quant.Calibration:
  """The calibration sequences (a seeded sample of the calibration text) and pairs."""
  ids = tok.special_ids(tokenizer)
  kw = dict(bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"] or 0,
            max_len=config.data.max_len)
  rng = np.random.default_rng(seed)
  n = int(config.quant.calib_sequences)
  if text_unit(config) == "window":
    stream, width = _stream(tokenizer, texts["train"]), int(config.data.max_len) - 1
    if len(stream) <= width:
      raise ValueError(f"The calibration text has {len(stream)} tokens, fewer than a window "
                       f"of data.max_len - 1 = {width}.")
    starts = rng.integers(0, len(stream) - width, size=n)
    x = np.stack([np.concatenate([[ids["bos"]], stream[s:s + width]]) for s in starts])
    tokens = gd.Tokens(x.astype(np.int32), np.full(n, width + 1, np.int32))
  else:
    rows = rng.permutation(len(texts["train"]))
    lines = [texts["train"][i] for i in rows[:n]]
    tokens = _trim(*tok.encode_batch(tokenizer, lines, **kw))
  source = config.quant.pair_source
  if source == "calibration":
    if texts["pairs"] is None:
      raise ValueError("quant.pair_source=calibration needs data.calibration_pairs "
                       "(a CrowS-Pairs-layout CSV).")
    a_text, b_text = texts["pairs"].sent_more, texts["pairs"].sent_less
    types = texts["pairs"].bias_type
  elif source == "stereoset":
    task = texts["stereoset"].tasks["intrasentence"]
    a_text, b_text, types = task.sentences[:, 0], task.sentences[:, 1], task.bias_type
  else:
    raise ValueError(f"Unknown quant.pair_source {source!r}. Valid: calibration, stereoset.")
  cap = int(config.quant.get("max_pairs_per_type", 0) or 0)
  if cap:  # each bias type's first `cap` pairs: Fair-GPTQ's cost grows with the pairs
    types = np.asarray(types)
    keep = np.sort(np.concatenate([np.flatnonzero(types == t)[:cap] for t in np.unique(types)]))
    a_text, b_text, types = np.asarray(a_text)[keep], np.asarray(b_text)[keep], types[keep]
  both = _trim(*tok.encode_batch(tokenizer, list(a_text) + list(b_text), **kw))
  m = len(a_text)
  pairs = (gd.Tokens(both.ids[:m], both.lengths[:m]), gd.Tokens(both.ids[m:], both.lengths[m:]))
  return lm_quant.Calibration(tokens, pairs, np.asarray(types))
