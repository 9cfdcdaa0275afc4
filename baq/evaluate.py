"""Evaluation of a model on a split: predictions, accuracy and fairness gaps.

Used by the trainer (validation during training), the experiment (the final
table) and `eval.py`, so a number means the same thing everywhere.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from baq import metrics as M
from baq.data.pipeline import eval_batches


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, images):
  return model.apply({"params": params}, images)


def predict_logits(model, params: Any, split, batch_size: int = 500) -> np.ndarray:
  """[N, C] logits of `model` on every example of `split`, in order."""
  out = []
  for batch in eval_batches(split, batch_size):
    logits = _logits(model, params, jnp.asarray(batch["image"]))
    out.append(np.asarray(logits)[np.asarray(batch["mask"]) > 0])
  return np.concatenate(out)


def evaluate_split(model, params: Any, split, batch_size: int = 500,
                   positive_class: int = 1) -> dict:
  """Accuracy, per-group accuracy and fairness gaps of `model` on `split`."""
  preds = predict_logits(model, params, split, batch_size).argmax(-1)
  return M.classification_metrics(preds, split.labels, split.groups, split.num_groups,
                                  positive_class)
