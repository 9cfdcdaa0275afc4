"""Measured sensitivity after short QAT: every unit (or cluster) at every bit-width, trained.

The "loss" measure (`baq.allocation.importance`) quantizes one unit at a time
in the float model and reads the loss at once. A unit's cost in the deployed
model is what is left after training adapts to it, with the other units and
the activations quantized too. `measure` probes that directly, as ALPS/EAGL
probe with short fine-tunes: for every probe p (a unit, or, when there are
too many, a cluster of a layer's channel units alike in a cheap importance)
and every candidate bit-width b, it starts from the float model with p's
units at b and every other unit at the highest choice, trains `steps` steps
of fair_static_qat (the config's quantizer, activations included, penalties
and optimizer; the same batches for every probe), recalibrates BatchNorm's
running statistics on training images (`recalibrate_batchnorm`), and
measures every group's mean loss on a group-balanced sample of a held-out
split. The sensitivity of
(p, b) is that minus the same procedure's with every unit at the highest
choice, so the highest choice costs exactly 0; a cluster's cost is shared
among its units by weight count. The result is a `planner.Analysis`, which
the exact minimax allocator reads as it reads any other.

Cost: (1 + probes x choices) x `steps` training steps, plus one evaluation
each; the protocol reports it as the arm's search time (the probes' weights
are thrown away; the kept run trains its full steps from the float model).
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from baq.allocation import planner, statistics
from baq.data.pipeline import Batcher, normalize, recipe
from baq.fairness import losses
from baq.quant import units
from baq.train.state import create_train_state
from baq.train.step import make_train_step
from baq.variables import apply_model

MODE = "fair_static_qat"  # the probes train at fixed integer bits, as the kept run does


def recalibrate_batchnorm(model, variables: dict, images: jax.Array) -> dict:
  """`variables` with every BatchNorm's running mean and variance set to `images`' statistics.

  One training-mode pass updates each running statistic r to m r + (1 - m) s
  for the batch's statistic s and the layer's momentum m. Two passes, from
  all-zero and all-one statistics, give (1 - m) s and m + (1 - m) s, so s =
  first / (1 - (second - first)), whatever each layer's momentum is. Each
  layer sees its inputs through the layers before it, whose own statistics
  do not enter a training-mode pass (they normalise by the batch's).

  Args:
    model: the model (training mode mutates "batch_stats").
    variables: {"params", "batch_stats"}; without batch_stats, returned as is.
    images: the recalibration batch (normalised).
  """
  stats = variables.get("batch_stats")
  if not stats:
    return variables

  def updated(fill):
    start = jax.tree.map(lambda v: jnp.full_like(v, fill), stats)
    _, new = apply_model(model, dict(variables, batch_stats=start), images, train=True,
                         mutable=["batch_stats"])
    return new["batch_stats"]
  first, second = updated(0.0), updated(1.0)
  exact = jax.tree.map(lambda a, b: a / (1.0 - (b - a)), first, second)
  return dict(variables, batch_stats=exact)


def probes(layers: Sequence[units.LayerUnits], max_probes: int,
           score: Optional[np.ndarray] = None) -> list[np.ndarray]:
  """Unit indices of each probe.

  Every unit alone when there are at most `max_probes` units. Else each
  layer's channel units are cut into clusters (a layer's clusters in
  proportion to its channels, at least one each), so that there are at most
  max(max_probes, layers) probes: runs of channels in order of `score` (one
  number per unit, e.g. a cheap importance, so that a cluster holds channels
  alike), or of their index without one.
  """
  counts = np.asarray([l.count for l in layers])
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  if counts.sum() <= max_probes:
    return [np.asarray([i]) for i in range(int(counts.sum()))]
  share = np.maximum(1, np.floor(max_probes * counts / counts.sum())).astype(int)
  out = []
  for start, count, k in zip(starts, counts, share):
    idx = start + np.arange(count)
    if score is not None:
      idx = idx[np.argsort(np.asarray(score)[idx], kind="stable")]
    out += [np.sort(c) for c in np.array_split(idx, min(k, count))]
  return out


def measure(config: ml_collections.ConfigDict, data: dict, float_vars: Any, *,
            steps: int, choices: Sequence[int], max_probes: int = 32, per_group: int = 64,
            heldout: str = "validation", recal_images: int = 512,
            score: Optional[np.ndarray] = None) -> tuple[planner.Analysis, float]:
  """The probed sensitivity of every unit at every choice (module docstring).

  Args:
    config: the run's config (quantizer, penalties, optimizer, batch size, seed).
    data: the splits; "train" and `heldout` are read.
    float_vars: the float model's variables (every probe's start).
    steps: QAT steps per probe (0: quantize, recalibrate and measure).
    choices: candidate integer bit-widths; the highest is every other unit's.
    max_probes: units probed one by one up to this many, else clustered.
    per_group: held-out examples per group the losses are measured on.
    heldout: the split measured on (never the test split).
    recal_images: training images BatchNorm is recalibrated on.
    score: one number per unit that orders a layer's channels into clusters
      (`probes`); None: their index order.

  Returns:
    (the Analysis, its seconds).
  """
  if heldout == "test":
    raise ValueError("The probes must not measure on the test split.")
  if steps < 0:
    raise ValueError(f"probe steps={steps} must be >= 0.")
  t0 = time.perf_counter()
  choices = tuple(sorted(int(c) for c in choices))
  split = data["train"]
  setup = create_train_state(
      config, MODE, num_classes=split.num_classes, num_groups=split.num_groups,
      image_shape=split.images.shape[1:], steps=max(steps, 1), lr=config.optim.finetune_lr,
      init_variables=float_vars)  # each probe sets its own bits (frozen: they never train)
  layers, G = setup.layers, split.num_groups
  numel = units.unit_numels(layers)
  step_fn = jax.jit(make_train_step(setup.model, setup.tx, setup.penalties, layers,
                                    num_groups=G, budget=setup.budget, bit_bounds=None,
                                    freeze_bits=True))
  train = Batcher(split, config.batch_size, seed=config.seed, sampling=config.dataset.sampling,
                  flip=config.dataset.flip, augment=recipe(config.dataset))
  batches = [{k: jnp.asarray(v) for k, v in train(s).items()} for s in range(steps)]
  recal = jnp.asarray(normalize(split.images[:recal_images]))
  calib = statistics.calibration_split(data[heldout], per_group, config.seed)
  images, labels = jnp.asarray(normalize(calib.images)), jnp.asarray(calib.labels)
  groups = jnp.asarray(calib.groups)
  count = jax.ops.segment_sum(jnp.ones_like(labels, jnp.float32), groups, G)

  @jax.jit
  def group_loss_of(variables, images, labels, groups, count):
    # The examples are arguments, not closed-over constants: XLA would fold
    # the first layers over them at compile time (seconds per program).
    per_ex = losses.cross_entropy(apply_model(setup.eval_model, variables, images), labels)
    return jax.ops.segment_sum(per_ex, groups, G) / jnp.maximum(count, 1.0)

  group_loss = lambda variables: group_loss_of(variables, images, labels, groups, count)

  recalibrate = jax.jit(lambda v, x: recalibrate_batchnorm(setup.model, v, x))

  def run(bits: np.ndarray) -> np.ndarray:
    state = dict(setup.state, params=units.scatter_bits(setup.state["params"], layers,
                                                        jnp.asarray(bits, jnp.float32)))
    for batch in batches:
      state, _ = step_fn(state, batch)
    variables = recalibrate(
        {"params": state["params"], "batch_stats": state.get("batch_stats", {})}, recal)
    return np.asarray(group_loss(variables), np.float64)

  high = np.full(len(numel), float(choices[-1]))
  base = run(high)
  sens = np.zeros((G, len(numel), len(choices)))
  for members in probes(layers, max_probes, score):
    share = numel[members] / numel[members].sum()
    for j, b in enumerate(choices[:-1]):
      bits = high.copy()
      bits[members] = b
      sens[:, members, j] = (run(bits) - base)[:, None] * share[None, :]
  analysis = planner.Analysis(units.unit_names(layers), numel, choices, sens[:, :, 0],
                              sens, np.asarray(count), "probed")
  return analysis, time.perf_counter() - t0

