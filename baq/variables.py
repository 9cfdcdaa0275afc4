"""Model variables and how a model is applied with them (the base of every layer).

A model is applied with its *variables*: {"params": ...} plus, for models
with BatchNorm, {"batch_stats": ...} (empty for the others). `apply_model`
is the one place that builds the `model.apply` call: it drops empty
collections and passes `train` only to models whose `__call__` takes it, so
a model without BatchNorm or dropout needs no `train` argument. Export,
training, evaluation and the study all apply models through it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Mapping

import jax

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
