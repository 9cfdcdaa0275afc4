"""Scoring a causal LM on the bias benchmarks: CrowS-Pairs, StereoSet and perplexity.

`encode` turns the benchmarks' sentences into token ids once per tokenizer;
`score` runs one model over them (log-likelihoods only, no statistics);
`summarize` turns scores into the reported metrics
(`baq.fairness.stereotype`), and, given the full-precision model's scores on
the same sentences, the paired change of the stereotype score with its
McNemar test and bootstrap interval.

Conventions: a CrowS-Pairs sentence scores its summed log-likelihood
log p(w_1..w_n | <bos>) (the causal-LM form of the metric; the pair differs
in a word or two, so lengths match closely). A StereoSet candidate scores
its mean per-token log-probability given its prefix (empty for
intrasentence, the context for intersentence), as the official generative
evaluation normalises by length. Perplexity is over the held-out text's
tokens after <bos>, <eos> included, per held-out text (in-domain first,
then an out-of-domain one when given); with `text_unit="window"` each line
is cut into windows (`baq.study.lm.texts.heldout_windows`).

Sentences are scored shortest first in chunks only as wide as their longest
row (`scoring.token_log_probs(bucket=...)`): CrowS-Pairs and StereoSet
sentences run from 10 to 150 tokens, and padding each to the longest cost
three times the compute. Chunks of 64 rows rounded to 8 tokens score
stories260K's 16,000 benchmark sentences in 15 s on this CPU, against 25 s
for 256 rows rounded to 32 (more programs compile, once per model).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from baq.data.text import tokenizer as tok
from baq.fairness import stereotype
from baq.models.lm import scoring
from baq.study.lm import texts


@dataclasses.dataclass
class Encoded:
  """Token ids of every benchmark sentence (right padded).

  Attributes:
    crows: (ids, lengths) of sent_more rows then sent_less rows ([2n, t]).
    stereoset: task -> (ids [3m, t], lengths, prefix lengths [3m]), candidates
      row-major (example, candidate).
    heldout: text name -> (ids, lengths) of its sequences, in-domain first.
  """
  crows: tuple
  stereoset: dict
  heldout: dict


def _ids(tokenizer, sentences, ids: dict, max_len: Optional[int]):
  return tok.encode_batch(tokenizer, list(sentences), bos_id=ids["bos"], eos_id=ids["eos"],
                          pad_id=ids["pad"] or 0, max_len=max_len)


def encode(crows, stereoset, heldout, tokenizer, *, max_len: Optional[int] = None,
           text_unit: str = "line", heldout_tokens: int = 0) -> Encoded:
  """Encodes CrowS-Pairs (`CrowsPairs`), StereoSet (`StereoSet` or None) and held-out text.

  The tokenizer needs a beginning-of-sequence token (every sentence is
  scored after it): `<bos>` for baq's word tokenizer, `<|endoftext|>` for
  GPT-2's.

  Args:
    crows, stereoset: the paired sets.
    heldout: the perplexity text's lines, or {name: lines} of several texts.
    tokenizer: the model's.
    max_len: tokens per sequence (longer ones are cut; None: no limit).
    text_unit: "line" (a line is a sequence) or "window" (a line is cut into
      windows of max_len tokens: `texts.heldout_windows`).
    heldout_tokens: with windows, scored tokens per text at most (0: all).
  """
  ids = tok.special_ids(tokenizer)
  if ids["bos"] is None:
    raise ValueError("The tokenizer has no beginning-of-sequence token (<bos>, <s> or "
                     "<|endoftext|>); every sentence is scored after one.")
  crows_ids = _ids(tokenizer, list(crows.sent_more) + list(crows.sent_less), ids, max_len)
  sets = {}
  for name, task in ({} if stereoset is None else stereoset.tasks).items():
    prefix, text = task.scoring_inputs()
    full = [f"{p} {t}".strip() for p, t in zip(prefix.ravel(), text.ravel())]
    # The prefix's tokens (with <bos>): the candidate starts after them.
    no_eos = dict(ids, eos=None)
    _, plen = _ids(tokenizer, [p if p else "" for p in prefix.ravel()], no_eos, max_len)
    sets[name] = _ids(tokenizer, full, ids, max_len) + (plen,)
  heldout = heldout if isinstance(heldout, dict) else {"heldout": heldout}
  if text_unit == "window":
    if max_len is None:
      raise ValueError("text_unit='window' needs max_len (the window).")
    held = {k: texts.heldout_windows(tokenizer, v, max_len, heldout_tokens, ids["pad"] or 0)
            for k, v in heldout.items()}
  elif text_unit == "line":
    held = {k: _ids(tokenizer, v, ids, max_len) for k, v in heldout.items()}
  else:
    raise ValueError(f"Unknown text_unit {text_unit!r}. Valid: {', '.join(texts.TEXT_UNITS)}.")
  return Encoded(crows_ids, sets, held)


def score(model, variables: Any, enc: Encoded, batch_size: int = 64, bucket: int = 8) -> dict:
  """Log-likelihoods of one model on every encoded sentence.

  Returns:
    dict(ll_more [n], ll_less [n], stereoset {task: [m, 3] mean per-token
    log-probabilities}, heldout {text: (nll [k, t-1], mask [k, t-1])}, and
    heldout_nll, heldout_mask: the first text's).
  """
  lp = lambda ids, lengths: np.asarray(scoring.token_log_probs(
      model, variables, ids, lengths, batch_size=batch_size, bucket=bucket), np.float64)
  ids, lengths = enc.crows
  ll = lp(ids, lengths).sum(1)
  n = len(ll) // 2
  out = {"ll_more": ll[:n], "ll_less": ll[n:], "stereoset": {}}
  for name, (ids, lengths, plen) in enc.stereoset.items():
    t = lp(ids, lengths)  # [3m, t-1]: token j's log-probability at column j - 1
    col = np.arange(1, ids.shape[1])[None, :]
    cand = (col >= plen[:, None]) & (col < lengths[:, None])
    mean = (t * cand).sum(1) / np.maximum(cand.sum(1), 1)
    out["stereoset"][name] = mean.reshape(-1, 3)
  out["heldout"] = {}
  for name, (ids, lengths) in enc.heldout.items():
    out["heldout"][name] = (-lp(ids, lengths),
                            np.arange(1, ids.shape[1])[None, :] < lengths[:, None])
  out["heldout_nll"], out["heldout_mask"] = next(iter(out["heldout"].values()))
  return out


def summarize(scores: dict, crows, stereoset, float_scores: Optional[dict] = None, *,
              num_samples: int = 1000, seed: int = 0) -> dict:
  """The metrics of one model (and its paired change from full precision).

  Args:
    scores: `score` output.
    crows: the `CrowsPairs` scored.
    stereoset: the `StereoSet` scored, or None.
    float_scores: the full-precision model's `score` output on the same
      sentences, for the paired change; None for the float model itself.
    num_samples: bootstrap replicates.
    seed: bootstrap seed.

  Returns:
    dict(crows, stereoset {task: ...}, perplexity (the first held-out text's),
    perplexities {text: ...}[, change]).
  """
  kw = dict(num_samples=num_samples, seed=seed)
  held = scores.get("heldout") or {"heldout": (scores["heldout_nll"], scores["heldout_mask"])}
  ppl = {k: stereotype.perplexity(nll, mask, **kw) for k, (nll, mask) in held.items()}
  out = {"crows": stereotype.crows_pairs_score(scores["ll_more"], scores["ll_less"],
                                               crows.direction, crows.bias_type, **kw),
         "perplexity": next(iter(ppl.values())), "perplexities": ppl,
         "stereoset": {}}
  for name, ll in scores["stereoset"].items():
    task = stereoset.tasks[name]
    out["stereoset"][name] = stereotype.stereoset_scores(ll, task.bias_type, target=task.target,
                                                         **kw)
  gap = scores["ll_more"] - scores["ll_less"]
  out["gap"] = dict(mean=float(gap.mean()), per_bias_type={
      b: float(gap[crows.bias_type == b].mean()) for b in sorted(set(crows.bias_type))})
  if float_scores is not None:
    pref = lambda s: stereotype.crows_pairs_preference(s["ll_more"], s["ll_less"])[0]
    out["change"] = stereotype.paired_stereotype_change(pref(scores), pref(float_scores),
                                                        crows.bias_type, **kw)
    out["gap_change"] = gap_change(gap, float_scores["ll_more"] - float_scores["ll_less"])
  return out


def gap_change(gap_quant: np.ndarray, gap_float: np.ndarray) -> dict:
  """The change of the per-pair stereotype gap ll(sent_more) - ll(sent_less), in nats.

  The score counts pairs whose gap is positive, so a model far from 50 %
  hides most of what quantization does; the gap is continuous. Tests: the
  paired t-test and the Wilcoxon signed-rank test over pairs (scipy).
  """
  from scipy import stats as sps  # pylint: disable=import-outside-toplevel
  d = np.asarray(gap_quant, np.float64) - np.asarray(gap_float, np.float64)
  nonzero = d[d != 0]
  return dict(change=float(d.mean()), abs_change=float(np.abs(d).mean()),
              p_t=float(sps.ttest_1samp(d, 0.0).pvalue) if d.std() > 0 else 1.0,
              p_wilcoxon=float(sps.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0)
