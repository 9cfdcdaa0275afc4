"""BAQ as a search phase for the exact solver: bits learned on held-out worst-group loss.

`search` trains a BAQ model for `steps` steps from the float weights with
`step.make_bilevel_step`: the weights on the training split, the bit-widths
on a held-out split sampled group-balanced (so the worst group's CVaR term
sees its examples in every batch), both under the config's penalties. What
the bits learned is then solved exactly at the budget (`projection.nearest`:
the integer allocation within the budget closest to the learned bits, the
rest of the budget spent), and the caller fine-tunes the remaining steps at
those integers from the search's weights, so the search's steps count in the
run's total. The result is saved to `path` and read back when it is there.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.allocation import projection
from baq.data.pipeline import Batcher, recipe
from baq.quant import units
from baq.train.state import create_train_state
from baq.train.step import make_bilevel_step

HELDOUT_SAMPLING = "group_balanced"


def search(config: ml_collections.ConfigDict, data: dict, float_vars: Any, *, steps: int,
           init_bits: Optional[np.ndarray], heldout: str = "validation",
           path: Optional[str] = None) -> dict:
  """The bi-level bit search and its exact integer allocation.

  Args:
    config: the run's config (its budget, penalties, optimizer and quantizer).
    data: the splits; "train" and `heldout` are read.
    float_vars: the float model's variables (the start).
    steps: search steps.
    init_bits: the bits to start from (e.g. the static plan), or None (the budget).
    heldout: the split the bits learn on (never the test split).
    path: a file the result is saved to and read back from.

  Returns:
    dict(bits: int64 [units] at the budget, learned: float [units] (the
    searched bits), variables: {"params", "batch_stats"} after the search,
    seconds: the search's wall time, steps).
  """
  if heldout == "test":
    raise ValueError("The bit search must not learn on the test split.")
  if path and os.path.exists(path):
    with open(path, "rb") as f:
      saved = flax.serialization.msgpack_restore(f.read())
    return dict(saved, bits=np.asarray(saved["bits"]), learned=np.asarray(saved["learned"]),
                seconds=float(saved["seconds"]), steps=int(saved["steps"]))
  t0 = time.perf_counter()
  split = data["train"]
  setup = create_train_state(
      config, "baq", num_classes=split.num_classes, num_groups=split.num_groups,
      image_shape=split.images.shape[1:], steps=steps, lr=config.optim.finetune_lr,
      init_bits=init_bits, init_variables=float_vars)
  q = config.quant
  step_fn = jax.jit(make_bilevel_step(setup.model, setup.tx, setup.penalties, setup.layers,
                                      num_groups=split.num_groups, budget=setup.budget,
                                      bit_bounds=(float(q.min_bits), float(q.max_bits))),
                    donate_argnums=0)
  train = Batcher(split, config.batch_size, seed=config.seed, sampling=config.dataset.sampling,
                  flip=config.dataset.flip, augment=recipe(config.dataset))
  held = Batcher(data[heldout], config.batch_size, seed=config.seed + 1,
                 sampling=HELDOUT_SAMPLING, flip=False)
  state = setup.state
  for s in range(steps):
    state, _ = step_fn(state, _device(train(s)), _device(held(s)))
  learned = np.asarray(units.gather_bits(state["params"], setup.layers), np.float64)
  bits = projection.nearest(learned, units.unit_numels(setup.layers), setup.budget,
                            q.min_bits, q.max_bits, spend=True)
  variables = jax.device_get({"params": state["params"],
                              "batch_stats": state.get("batch_stats", {})})
  out = dict(bits=np.asarray(bits, np.int64), learned=learned, variables=variables,
             seconds=time.perf_counter() - t0, steps=int(steps))
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(out))
    os.replace(tmp, path)
  return out


def _device(batch: dict) -> dict:
  """A host batch (already normalised) as device arrays."""
  return {k: jnp.asarray(v) for k, v in batch.items()}
