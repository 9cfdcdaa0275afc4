"""Evaluation of a model on a split: predictions, accuracy and fairness gaps.

Used by the trainer (validation during training), the experiment (the final
table) and `eval.py`, so a number means the same thing everywhere.

Models are applied with their variables through `baq.variables.apply_model`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from baq.fairness import metrics
from baq.variables import apply_model, as_variables
from baq.data.pipeline import eval_batches

@functools.partial(jax.jit, static_argnums=0)
def _logits(model, variables, images):
  return apply_model(model, variables, images)


def predict_logits(model, variables: Any, split, batch_size: int = 500) -> np.ndarray:
  """[N, C] logits of `model` on every example of `split`, in order.

  Args:
    model: the model, applied with train=False.
    variables: its {"params", "batch_stats"} (or bare params).
    split: the examples.
    batch_size: examples per pass (the last batch is padded).
  """
  variables = as_variables(variables)
  out = []
  for batch in eval_batches(split, batch_size):
    logits = _logits(model, variables, jnp.asarray(batch["image"]))
    if not logits.is_fully_addressable and not logits.is_fully_replicated:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      logits = multihost_utils.process_allgather(logits, tiled=True)
    out.append(np.asarray(logits)[np.asarray(batch["mask"]) > 0])
  return np.concatenate(out)


def evaluate_split(model, variables: Any, split, batch_size: int = 500,
                   positive_class: int = 1) -> dict:
  """Accuracy, per-group accuracy and fairness gaps of `model` on `split`.

  `variables` is {"params", "batch_stats"} or bare params (see
  `predict_logits`).
  """
  preds = predict_logits(model, variables, split, batch_size).argmax(-1)
  return metrics.classification_metrics(preds, split.labels, split.groups, split.num_groups,
                                  positive_class)
