"""How a bit-training run turns its searched bits into integers: nearest, or measured.

`quant.rounding` chooses, at the step where a BAQ run freezes its bits:
  nearest   the integers nearest the searched bits under the budget
            (`projection.deploy`: an exact knapsack, the budget spent);
  measured  the integers the model itself prefers: `projection.measured`
            scores each unit at each bit-width, every other unit at its
            current integer, by the deployed model's loss on a
            group-balanced calibration sample of the training split, and
            solves the budgeted knapsack on those costs.

`quant.rounding_loss` is what `measured` minimises: "worst_group" (the
largest group mean cross-entropy) or "mean" (the groups' mean, each group
weighing the same). The Pareto benchmark's no-penalty variant uses "mean",
so no fairness term enters there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.allocation import projection, statistics
from baq.data.pipeline import normalize
from baq.fairness import losses
from baq.quant import units
from baq.variables import apply_model

ROUNDINGS = ("nearest", "measured")
ROUNDING_LOSSES = ("worst_group", "mean")


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses an unknown rounding or rounding loss, listing the valid ones."""
  q = config.quant
  if q.get("rounding", "nearest") not in ROUNDINGS:
    raise ValueError(f"Unknown quant.rounding {q.rounding!r}. Valid: {', '.join(ROUNDINGS)}.")
  if q.get("rounding", "nearest") == "measured" and q.granularity != "layer":
    raise ValueError("quant.rounding='measured' scores every unit at every bit-width, one "
                     "pass each: it needs quant.granularity='layer' (channel units: 'nearest').")
  if q.get("rounding_loss", "worst_group") not in ROUNDING_LOSSES:
    raise ValueError(f"Unknown quant.rounding_loss {q.rounding_loss!r}. "
                     f"Valid: {', '.join(ROUNDING_LOSSES)}.")


def integer_params(config: ml_collections.ConfigDict, setup, params: Any, batch_stats: Any,
                   split) -> Any:
  """`params` with integer bits meeting `setup.budget`, by `config.quant.rounding`."""
  q, layers = config.quant, setup.layers
  if q.get("rounding", "nearest") == "nearest":
    return projection.deploy(params, layers, setup.budget, q.min_bits, q.max_bits)[1]
  calib = statistics.calibration_split(split, config.importance.calib_per_group, config.seed)
  images, labels = jnp.asarray(normalize(calib.images)), jnp.asarray(calib.labels)
  groups, G = jnp.asarray(calib.groups), calib.num_groups
  worst = q.get("rounding_loss", "worst_group") == "worst_group"

  @jax.jit
  def loss(p):
    logits = apply_model(setup.eval_model, dict(params=p, batch_stats=batch_stats), images)
    # Groups of the calibration sample (an absent group would count as 0).
    per_group = losses.group_stats(losses.cross_entropy(logits, labels), groups, G).mean
    return jnp.max(per_group) if worst else jnp.mean(per_group)

  ints = projection.measured(lambda b: loss(units.scatter_bits(params, layers, b)),
                             np.asarray(units.gather_bits(params, layers), np.float64),
                             units.unit_numels(layers), setup.budget, q.min_bits, q.max_bits)
  return units.scatter_bits(params, layers, ints)
