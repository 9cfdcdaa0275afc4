"""Fair-GPTQ's paired inputs: two aligned batches showing the same case for two groups.

Fair-GPTQ (`baq.ptq.sequential.quantize_model(pairs=...)`) needs x_a[i] and
x_b[i] to differ in the group and as little else as possible. Two sources:

  * counterfactual renders (the embedded synthetic data): the same training
    lesion drawn on skin type g and on the reference type;
  * matching (real data, `match_pairs`): each example of group g is paired
    with the nearest same-label example of the reference group, on the float
    model's penultimate features (`penultimate_features`) or on pixels.

`fair_pairs` builds them for the bias study (`baq.study.bias.runner`), with the choice,
the reference group and the pair count set by the study options.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from scipy.spatial.distance import cdist

from baq.data import datasets
from baq.data.pipeline import normalize
from baq.variables import apply_model


def match_pairs(features: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                group_a: int, group_b: int) -> tuple[np.ndarray, np.ndarray]:
  """Pairs examples of group a with same-label examples of group b.

  Rule: within each label, all (a, b) pairs are ranked by the L2 distance of
  their (flattened) features and taken greedily, nearest first, each example
  used at most once; a's left without a b of their label are dropped.

  Args:
    features: [n, ...] features or images.
    labels: [n] class ids.
    groups: [n] group ids.
    group_a: group whose examples are matched.
    group_b: group they are matched to.

  Returns:
    (idx_a, idx_b): aligned indices into the n examples, sorted by idx_a.
  """
  f = np.asarray(features, np.float64).reshape(len(labels), -1)
  labels, groups = np.asarray(labels), np.asarray(groups)
  ia, ib = [], []
  for lab in np.unique(labels[groups == group_a]):
    a = np.nonzero((groups == group_a) & (labels == lab))[0]
    b = np.nonzero((groups == group_b) & (labels == lab))[0]
    if not len(b):
      continue
    dist = cdist(f[a], f[b])
    used_a, used_b = np.zeros(len(a), bool), np.zeros(len(b), bool)
    for k in np.argsort(dist, axis=None, kind="stable"):
      i, j = divmod(int(k), len(b))
      if not used_a[i] and not used_b[j]:
        used_a[i] = used_b[j] = True
        ia.append(a[i])
        ib.append(b[j])
        if used_a.all() or used_b.all():
          break
  order = np.argsort(ia, kind="stable")
  return np.asarray(ia, np.int64)[order], np.asarray(ib, np.int64)[order]


def penultimate_features(model: nn.Module, variables: Any, x: np.ndarray,
                         batch_size: int = 256) -> np.ndarray:
  """The inputs of the model's last Dense/Conv call (the head's features).

  Args:
    model: the float model.
    variables: its variables (or bare params).
    x: [n, H, W, C] normalised images.
    batch_size: examples per forward pass.

  Returns:
    [n, d] features.
  """
  def features(xb):
    seen = []

    def grab(fn, args, kwargs, context):
      if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
        seen.append(args[0] if args else kwargs["inputs"])
      return fn(*args, **kwargs)

    with nn.intercept_methods(grab):
      apply_model(model, variables, xb)
    return seen[-1].reshape(xb.shape[0], -1)
  run = jax.jit(features)
  return np.concatenate([np.asarray(run(x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)])


def fair_pairs(config, s, data: dict, model, variables, seed: int) -> tuple[tuple, dict]:
  """Fair-GPTQ's aligned pair batches, normalised, and how they were made.

  Args:
    config: the seed's config (dataset name and options).
    s: the study options (pairs, num_pairs, pair_reference, pair_pool,
      calib_batch).
    data: the splits (pairs come from "train").
    model: the float model (for "penultimate" matching).
    variables: its variables.
    seed: draws the examples.

  Returns:
    ((x_a, x_b), how): aligned [P, H, W, C] batches, and dict(pairs,
    pair_reference, num_pairs, pair_groups) for the cell's metrics.
  """
  train_split = data["train"]
  count = np.bincount(train_split.groups, minlength=train_split.num_groups)
  ref = int(np.argmax(count)) if s.pair_reference < 0 else int(s.pair_reference)
  others = [g for g in range(train_split.num_groups) if g != ref and count[g]]
  per = max(1, s.num_pairs // max(len(others), 1))
  how = s.pairs if s.pairs != "auto" else (
      "counterfactual" if config.dataset.name == "synthetic_derm" else "penultimate")
  rng = np.random.default_rng([seed, 2])
  xa, xb = [], []
  if how == "counterfactual":
    for g in others:
      idx = np.sort(rng.choice(len(train_split), per, replace=False))
      cf = datasets.counterfactual_pairs(config.dataset.train_split, (g, ref), idx,
                                         **config.dataset.kwargs.to_dict())
      xa.append(cf["image"][0])
      xb.append(cf["image"][1])
  else:
    pool = np.sort(rng.choice(len(train_split), min(s.pair_pool, len(train_split)), False))
    images = train_split.images[pool]
    feats = (penultimate_features(model, variables, normalize(images), s.calib_batch)
             if how == "penultimate" else images)
    for g in others:
      ia, ib = match_pairs(feats, train_split.labels[pool], train_split.groups[pool], g, ref)
      keep = np.sort(rng.permutation(len(ia))[:per])
      xa.append(images[ia[keep]])
      xb.append(images[ib[keep]])
  xa, xb = np.concatenate(xa), np.concatenate(xb)
  return (normalize(xa), normalize(xb)), dict(pairs=how, pair_reference=ref,
                                               num_pairs=len(xa), pair_groups=others)
