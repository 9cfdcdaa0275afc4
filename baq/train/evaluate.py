"""Evaluation of a model on a split: predictions, accuracy and fairness gaps.

Used by the trainer (validation during training), the experiment (the final
table) and `eval.py`, so a number means the same thing everywhere.

A model is applied with its *variables*: {"params": ...} plus, for models
with BatchNorm, {"batch_stats": ...} (empty for the others). `apply_model`
is the one place that builds the `model.apply` call: it drops empty
collections and passes `train` only to models whose `__call__` takes it, so
a model without BatchNorm or dropout needs no `train` argument.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from baq.fairness import metrics as M
from baq.data.pipeline import eval_batches

COLLECTIONS = ("params", "batch_stats")


def as_variables(tree: Any) -> dict:
  """`tree` as a variables dict: a bare params tree becomes {"params": tree}.

  A dict whose keys are all variable collections ("params", "batch_stats")
  is taken as variables already; module names never collide with them.
  """
  if isinstance(tree, Mapping) and "params" in tree and set(tree) <= set(COLLECTIONS):
    return dict(tree)
  return {"params": tree}


@functools.lru_cache(maxsize=None)
def takes_train(module_type: type) -> bool:
  """Whether a module class's `__call__` has a `train` argument."""
  return "train" in inspect.signature(module_type.__call__).parameters


def apply_model(model, variables: Any, x: jax.Array, *, train: bool = False, **kwargs):
  """`model.apply` with the model's variables.

  Args:
    model: a Flax module.
    variables: {"params", "batch_stats"} (or bare params); empty
      collections are left out.
    x: the input batch.
    train: batch statistics (and, with `mutable=["batch_stats"]`, their
      update) and dropout; passed only to models that take `train`.
    **kwargs: for `model.apply` (`rngs`, `mutable`, ...).

  Returns:
    What `model.apply` returns: the output, or (output, mutated collections)
    when `mutable` is given.
  """
  variables = {k: v for k, v in as_variables(variables).items() if k == "params" or v}
  if takes_train(type(model)):
    kwargs["train"] = train
  return model.apply(variables, x, **kwargs)


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
  return M.classification_metrics(preds, split.labels, split.groups, split.num_groups,
                                  positive_class)
