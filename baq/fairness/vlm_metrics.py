"""Bias metrics of vision-language embeddings: zero-shot disparity, retrieval skew, tests.

Pure numpy/scipy functions of embeddings, predictions and group ids; nothing
runs a model. Definitions (the study compares a quantized model with the
float one on the same images and queries):

  zero-shot class of an image = argmax_c cos(image, class text embedding c).
  recall_g(c) = share of group g's images of class c predicted as c.
  FACET disparity (Gustafson et al. 2023) for groups a, b and class
    c: recall_a(c) - recall_b(c); positive when the model favours a.
  Skew_g@k (Geyik et al. 2019) of one query's ranking = ln(p_g,k / d_g),
    p_g,k the share of group g among the top k images, d_g its desired
    share; MaxSkew@k = max_g, MinSkew@k = min_g, over the gallery's groups.
  NDKL (Geyik et al. 2019) = (1/Z) sum_{i=1..k} KL(P_i || D) / log2(i + 1),
    P_i the group shares of the top i, D the desired shares, Z = sum_{i=1..k}
    1 / log2(i + 1), with 0 ln 0 = 0 (no smoothing needed).
Retrieval metrics are computed per query, then averaged over queries, as in
Berg et al. 2022 ("A prompt array keeps the bias away", oxai/debias-vision-
lang, measuring_bias.py), whose conventions are the defaults here: the
desired shares are the gallery's group proportions ("dem_par"; "uniform",
their "eq_opp", is 1/G over the gallery's G groups), and a group absent from
the top k counts once (p = 1/k) so its skew stays finite. Ties in similarity
keep gallery order (a stable sort), as `metrics.skew_at_k`, which serves the
additive-smoothing option.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import stats as sps

from baq.fairness import metrics

VERDICTS = ("amplified", "reduced", "no change")
# Which sign of (quantized - float) means more bias, per measure. A skew is
# more biased the further it is from 0: MaxSkew (>= 0 under the default
# conventions) by rising, MinSkew (<= 0 but for a tiny k) by falling; a gap or NDKL by rising;
# a group's accuracy (or the worst group's) by falling. For changes of |skew|
# use "abs_skew".
DIRECTIONS = {"up": 1, "down": -1, "max_skew": 1, "min_skew": -1, "abs_skew": 1,
              "ndkl": 1, "gap": 1, "accuracy": -1}
_CHUNK_ELEMENTS = 2**22  # bounds NDKL's [queries, k, G] cumulative shares


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_similarity(a, b) -> np.ndarray:
  """[m, n] cosine similarities of rows of a [m, e] and b [n, e] (normalised here)."""
  return _unit(a) @ _unit(b).T


def zero_shot_predictions(image_emb, class_text_emb) -> np.ndarray:
  """int64 [n] zero-shot class of each image: the class text of largest cosine.

  Args:
    image_emb: [n, e] image embeddings (normalised here if they are not).
    class_text_emb: [c, e] one embedding per class (e.g. the normalised mean
      of a class's prompt embeddings).
  """
  return np.argmax(cosine_similarity(image_emb, class_text_emb), axis=1)


def _listed(a) -> list:
  """Nested lists with NaN as None (JSON-ready)."""
  return np.where(np.isnan(a), None, a).tolist()


def _group_counts(groups: np.ndarray, num_groups: int, attribute: str) -> np.ndarray:
  """[G] examples per group, refusing ids out of range and a single group."""
  if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
    raise ValueError(f"attribute {attribute!r}: group ids must lie in [0, {num_groups}), "
                     f"got {groups.min()}..{groups.max()}.")
  counts = np.bincount(groups, minlength=num_groups)
  present = np.flatnonzero(counts)
  if present.size < 2:
    raise ValueError(
        f"attribute {attribute!r} has a single group with examples (group ids "
        f"{present.tolist()}, counts {counts.tolist()}): a disparity needs at least two.")
  return counts


def group_accuracy_disparity(pred, label, groups, num_groups: int, attribute: str = "group",
                             num_classes: Optional[int] = None) -> dict:
  """Per-group accuracy and per-class recall, their gaps and FACET's disparity.

  Args:
    pred: [n] predicted class ids (e.g. `zero_shot_predictions`).
    label: [n] true class ids.
    groups: [n] group ids in [0, num_groups) of one attribute (filter out an
      unknown group first if it should not count as one).
    num_groups: G.
    attribute: the attribute's name, for messages.
    num_classes: C (default: 1 + the largest id in pred and label).

  Returns:
    dict with, from `metrics.classification_metrics`: accuracy,
    group_accuracy [G], group_count [G], worst_group, worst_group_accuracy,
    best_group_accuracy, accuracy_gap (best minus worst group); and
    class_recall [G][C], class_count [G][C], disparity [G][G][C]
    (recall_a(c) - recall_b(c) at [a][b][c]), class_recall_gap [C] (max
    minus min recall over the groups having class c; None when fewer than two
    do), max_class_recall_gap, max_gap_class, mean_class_recall_gap, attribute.
    Undefined entries (no examples) are None.

  Raises:
    ValueError: group ids out of range, or fewer than two groups with
      examples (the message names the attribute).
  """
  pred, label, groups = (np.asarray(a).astype(np.int64).ravel() for a in (pred, label, groups))
  _group_counts(groups, num_groups, attribute)
  c = int(num_classes or max(pred.max(), label.max()) + 1)
  base = metrics.classification_metrics(pred, label, groups, num_groups)
  cell = groups * c + label
  count = np.bincount(cell, minlength=num_groups * c).reshape(num_groups, c)
  hits = np.bincount(cell, weights=(pred == label).astype(np.float64),
                     minlength=num_groups * c).reshape(num_groups, c)
  recall = np.where(count > 0, hits / np.maximum(count, 1), np.nan)
  have = ~np.isnan(recall)
  gap = np.where(have.sum(0) >= 2, np.where(have, recall, -np.inf).max(0)
                 - np.where(have, recall, np.inf).min(0), np.nan)
  out = {key: base[key] for key in ("accuracy", "group_accuracy", "group_count", "worst_group",
                                    "worst_group_accuracy", "best_group_accuracy",
                                    "accuracy_gap")}
  defined = not np.all(np.isnan(gap))
  out.update(
      attribute=attribute, class_recall=_listed(recall), class_count=count.tolist(),
      disparity=_listed(recall[:, None, :] - recall[None, :, :]),
      class_recall_gap=_listed(gap),
      max_class_recall_gap=float(np.nanmax(gap)) if defined else None,
      max_gap_class=int(np.nanargmax(gap)) if defined else None,
      mean_class_recall_gap=float(np.nanmean(gap)) if defined else None)
  return out


def _desired(desired, population: np.ndarray) -> np.ndarray:
  """[G] desired shares: gallery proportions, uniform over present groups, or given."""
  present = population > 0
  if desired is None or (isinstance(desired, str) and desired == "gallery"):
    return population / population.sum()
  if isinstance(desired, str):
    if desired != "uniform":
      raise ValueError(f"Unknown desired distribution {desired!r}. Valid: gallery, "
                       "uniform, or an array of shares.")
    return present / present.sum()
  want = np.asarray(desired, np.float64)
  if (want.shape != population.shape or not np.all(np.isfinite(want)) or np.any(want < 0)
      or np.any(want[present] <= 0) or abs(want[present].sum() - 1) > 1e-6):
    raise ValueError(f"desired shares must be {population.size} finite values, positive "
                     f"on the gallery's groups and summing to 1 there; got {want.tolist()}.")
  return want


def _ndkl(top: np.ndarray, want: np.ndarray) -> np.ndarray:
  """[q] NDKL of each query's top-k groups [q, k] against the shares `want`."""
  q, k = top.shape
  ranks = np.arange(1, k + 1, dtype=np.float64)
  weight = 1 / np.log2(ranks + 1)
  log_want = np.log(np.where(want > 0, want, 1.0))  # p_g = 0 wherever want_g = 0
  out = np.empty(q)
  chunk = max(1, _CHUNK_ELEMENTS // (k * want.size))
  for s in range(0, q, chunk):
    share = np.cumsum(top[s:s + chunk, :, None] == np.arange(want.size), axis=1) / ranks[:, None]
    terms = np.where(share > 0, share * (np.log(np.where(share > 0, share, 1.0)) - log_want), 0)
    out[s:s + chunk] = terms.sum(-1) @ weight / weight.sum()
  return out


def retrieval_skew(similarity, groups, k: int, desired=None, num_groups: Optional[int] = None,
                   smoothing="count_one", attribute: str = "group") -> dict:
  """MaxSkew@k, MinSkew@k and NDKL of text-to-image retrieval, per query and mean.

  Args:
    similarity: [q, n] query-by-gallery similarities (or [n] for one query).
    groups: [n] group id of each gallery image.
    k: ranks considered, 1 <= k <= n.
    desired: None or 'gallery' (the gallery's group proportions, default),
      'uniform' (1/G over the gallery's groups), or [G] shares.
    num_groups: G (default 1 + the largest id).
    smoothing: 'count_one' (default; a group absent from the top k counts
      once, p = 1/k, as Berg et al. 2022) or a float s for additive smoothing
      p = (c + s) / (k + s G), G the gallery's groups (`metrics.skew_at_k`).
    attribute: the attribute's name, for messages.

  Returns:
    dict(max_skew, min_skew, ndkl: means over queries; max_skew_per_query,
    min_skew_per_query, ndkl_per_query [q]; max_group_per_query,
    min_group_per_query [q]; skew [q][G] (None for groups not in the
    gallery); desired [G]; k; num_queries; smoothing).

  Raises:
    ValueError: k > n (naming both) or k < 1; shapes disagree; group ids
      out of range or fewer than two groups in the gallery (naming the
      attribute); bad desired shares.
  """
  sim = np.atleast_2d(np.asarray(similarity, np.float64))
  groups = np.asarray(groups).astype(np.int64).ravel()
  q, n = sim.shape
  if groups.size != n:
    raise ValueError(f"{groups.size} group ids for a gallery of {n} images.")
  if k > n:
    raise ValueError(f"k={k} is larger than the gallery ({n} images); use k <= {n}.")
  if k < 1:
    raise ValueError(f"k={k} must be at least 1.")
  g = int(num_groups or groups.max() + 1)
  population = _group_counts(groups, g, attribute).astype(np.float64)
  want, present = _desired(desired, population), population > 0
  top = groups[np.argsort(-sim, axis=1, kind="stable")[:, :k]]
  if isinstance(smoothing, str):
    if smoothing != "count_one":
      raise ValueError(f"Unknown smoothing {smoothing!r}. Valid: count_one, or a float.")
    counts = np.bincount((top + g * np.arange(q)[:, None]).ravel(), minlength=q * g)
    share = np.maximum(counts.reshape(q, g), 1) / k
    skew = np.where(present, np.log(share) - np.log(np.where(present, want, 1.0)), np.nan)
  else:
    skew = np.array([metrics.skew_at_k(row, groups, g, k, float(smoothing), want)["skew"]
                     for row in sim], np.float64)
  ndkl = _ndkl(top, want)
  hi, lo = np.where(present, skew, -np.inf), np.where(present, skew, np.inf)
  return dict(max_skew=float(hi.max(1).mean()), min_skew=float(lo.min(1).mean()),
              ndkl=float(ndkl.mean()), max_skew_per_query=hi.max(1).tolist(),
              min_skew_per_query=lo.min(1).tolist(), ndkl_per_query=ndkl.tolist(),
              max_group_per_query=hi.argmax(1).tolist(),
              min_group_per_query=lo.argmin(1).tolist(), skew=_listed(skew),
              desired=want.tolist(), k=int(k), num_queries=q, smoothing=smoothing)


def paired_t(values_quant, values_float) -> dict:
  """Paired t-test (scipy.stats.ttest_rel) of per-query or per-image values.

  Pairs are the same query (its skew, NDKL) or the same image (its 0/1
  correctness) under the quantized and the float model.

  Returns:
    dict(n, mean_quant, mean_float, mean_change (quant - float), t, p, df).
    Every pair equal: t = 0, p = 1. A constant non-zero difference: t = +-inf,
    p = 0.
  """
  vq = np.asarray(values_quant, np.float64).ravel()
  vf = np.asarray(values_float, np.float64).ravel()
  if vq.shape != vf.shape or vq.size < 2:
    raise ValueError(f"paired_t needs two series of the same length >= 2, got "
                     f"{vq.size} and {vf.size} values.")
  d = vq - vf
  out = dict(n=int(d.size), mean_quant=float(vq.mean()), mean_float=float(vf.mean()),
             mean_change=float(d.mean()), df=int(d.size - 1))
  if np.all(d == d[0]):  # zero variance: the t statistic is 0/0 or c/0
    out.update(t=0.0 if d[0] == 0 else float(np.sign(d[0]) * np.inf),
               p=1.0 if d[0] == 0 else 0.0)
  else:
    res = sps.ttest_rel(vq, vf)
    out.update(t=float(res.statistic), p=float(res.pvalue))
  return out


def verdict(change, p, alpha: float = 0.05, direction: str = "up"):
  """'amplified', 'reduced' or 'no change' from a change (quantized - float) and p.

  Args:
    change: quantized minus float value of a bias measure (scalar or array).
    p: its p-value (e.g. `paired_t(...)['p']`, or Holm-adjusted ones).
    alpha: significance level; p >= alpha (or NaN, or change 0) is 'no change'.
    direction: which sign of change is more bias: a key of DIRECTIONS, e.g.
      'max_skew', 'ndkl', 'gap', 'abs_skew' or 'up' (a rise is amplified),
      'min_skew', 'accuracy' or 'down' (a fall is amplified).

  Returns:
    One verdict string, or a list of them for array inputs.
  """
  if direction not in DIRECTIONS:
    raise ValueError(f"Unknown direction {direction!r}. Valid: {', '.join(DIRECTIONS)}.")
  c, pv = np.broadcast_arrays(np.asarray(change, np.float64), np.asarray(p, np.float64))
  signed = DIRECTIONS[direction] * c
  sig = np.nan_to_num(pv, nan=1.0) < alpha
  out = np.where(sig & (signed > 0), VERDICTS[0], np.where(sig & (signed < 0), VERDICTS[1],
                                                             VERDICTS[2]))
  return str(out) if out.ndim == 0 else out.tolist()
