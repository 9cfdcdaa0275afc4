"""A deterministic, stateless batcher over an in-memory `Split`.

The batch of training step s is a pure function of (seed, s): there is no
iterator state to checkpoint, and a run resumed at step s sees exactly the
batches an uninterrupted run would have seen.

  * 'uniform' sampling walks epochs without replacement: epoch
    e = s // steps_per_epoch uses the permutation of
    `np.random.default_rng([seed, e])`, and step s takes its slice.
  * 'group_balanced' sampling draws, for each example of the batch, a group
    uniformly among the groups present and then an example of that group,
    from `np.random.default_rng([seed, s, 1])`; rare groups are oversampled.

Images become float32, normalised with fixed per-channel constants (not
per-batch statistics, which would make an example's input depend on its
batch). `eval_batches` walks a split once, in order, padded to full batches
with a `mask`, so an evaluation step compiles once.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from baq.data import augment as aug
from baq.data.datasets import Split

# Per-channel mean and std of uint8 pixels, measured on the synthetic_derm
# train split; close to zero mean and unit std for skin-like images.
MEAN_RGB = (173.0, 134.0, 113.0)
STD_RGB = (39.0, 37.0, 36.0)
SAMPLINGS = ("uniform", "group_balanced")
# Extra seed words, so that the streams of one step never coincide.
_BALANCED_STREAM, _FLIP_STREAM = 1, 2


def normalize(images: np.ndarray, mean=MEAN_RGB, std=STD_RGB) -> np.ndarray:
  """uint8-scale [..., C] images (uint8 or float) to float32 (x - mean) / std.

  The per-channel constants are tiled along whole rows ([..., W * C]): with
  a [C] operand numpy's inner loop runs over 3-long pixels, several times
  slower than over rows, and the cast happens inside the subtraction
  instead of in a pass of its own. Same operations, same values.
  """
  images = np.asarray(images)
  ch = images.shape[-1]
  lane = ch * (images.shape[-2] if images.ndim > 1 else 1)
  mean = np.tile(np.asarray(mean, np.float32), lane // ch)
  std = np.tile(np.asarray(std, np.float32), lane // ch)
  out = np.subtract(images.reshape(-1, lane), mean, dtype=np.float32)
  out /= std
  return out.reshape(images.shape)


class Batcher:
  """Training batches as a pure function of the step number.

  Attributes:
    steps_per_epoch: batches per epoch for 'uniform' sampling.
  """

  def __init__(self, split: Split, batch_size: int, seed: int = 0,
               sampling: str = "uniform", drop_remainder: bool = True,
               flip: bool = False, mean=MEAN_RGB, std=STD_RGB,
               augment: Optional[aug.Recipe] = None, rows: Optional[np.ndarray] = None):
    """Builds the batcher; it holds no state that changes with the step.

    Args:
      split: the examples.
      batch_size: examples per batch.
      seed: base seed of every random choice.
      sampling: 'uniform' or 'group_balanced'.
      drop_remainder: for 'uniform', drop the last partial batch of each
        epoch (so shapes never change); otherwise it is a smaller batch.
      flip: random horizontal flips, each a function of (seed, step).
      mean: per-channel normalisation mean (uint8 scale).
      std: per-channel normalisation std (uint8 scale).
      augment: an augmentation recipe (`baq.data.augment`), applied after
        `flip`; each example's draws are a function of (seed, step, its
        position in the batch).
      rows: the positions of the global batch this process reads and returns
        (its shard on several hosts); None: the whole batch.
    """
    if sampling not in SAMPLINGS:
      raise ValueError(f"Unknown sampling {sampling!r}; valid: {SAMPLINGS}.")
    n = len(split)
    if batch_size <= 0 or (drop_remainder and batch_size > n):
      raise ValueError(f"batch_size {batch_size} does not fit {n} examples.")
    self.split, self.batch_size, self.seed = split, batch_size, seed
    self.sampling, self.flip = sampling, flip
    self.augment = augment if augment is not None and augment.active else None
    self.rows = None if rows is None else np.asarray(rows, np.int64)
    self.mean, self.std = mean, std
    self.steps_per_epoch = (n // batch_size if drop_remainder
                            else -(-n // batch_size))
    # Examples sorted by group, and where each present group starts, so a
    # balanced draw is two vectorised lookups.
    self._perm = (-1, None)
    self._by_group = np.argsort(split.groups, kind="stable")
    _, self._group_start, self._group_size = np.unique(
        split.groups[self._by_group], return_index=True, return_counts=True)

  def indices(self, step: int) -> np.ndarray:
    """Indices into the split of the examples of batch `step`."""
    if self.sampling == "group_balanced":
      rng = np.random.default_rng([self.seed, step, _BALANCED_STREAM])
      which = rng.integers(0, len(self._group_size), self.batch_size)
      pick = (rng.random(self.batch_size) * self._group_size[which]).astype(
          np.int64)
      return self._by_group[self._group_start[which] + pick]
    epoch, within = divmod(step, self.steps_per_epoch)
    if self._perm[0] != epoch:  # A cache, not state: a pure function of epoch.
      self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(
          len(self.split)))
    perm = self._perm[1]
    return perm[within * self.batch_size:(within + 1) * self.batch_size]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch of training step `step` (a non-negative int).

    Args:
      step: global step; the result depends only on it and the constructor.

    Returns:
      dict with `image` float32 [B, H, W, C] (normalised), `label` int32 [B]
      and `group` int32 [B].
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    idx = self.indices(step)
    pos = np.arange(len(idx)) if self.rows is None else self.rows
    idx = idx[pos]
    images = self.split.images[idx]
    if self.flip:
      rng = np.random.default_rng([self.seed, step, _FLIP_STREAM])
      flip = (rng.random(self.batch_size) < 0.5)[pos]
      images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    if self.augment is not None:
      images = aug.augment(images, self.augment, self.seed, step, positions=pos)
    return {"image": normalize(images, self.mean, self.std),
            "label": self.split.labels[idx].astype(np.int32),
            "group": self.split.groups[idx].astype(np.int32)}

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return self.batch(step)


def batches(batcher: Batcher, start: int, stop: int, workers: int = 0
            ) -> Iterator[dict[str, np.ndarray]]:
  """`batcher.batch(s)` for s in [start, stop), in order.

  With `workers` > 0 the batches are made (read, augmented, normalised) in
  that many grain worker processes, ahead of the step that consumes them.
  Every batch is a pure function of its step, so a run resumed at `start`
  gets exactly the batches an uninterrupted one would.
  """
  if workers <= 0:
    for s in range(start, stop):
      yield batcher.batch(s)
    return
  import grain  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():  # grain reads its absl flags (defaults outside an app)
    flags.FLAGS.mark_as_parsed()
  ds = grain.MapDataset.range(start, stop).map(batcher.batch).to_iter_dataset()
  yield from ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                          per_worker_buffer_size=2))


def recipe(dataset_config) -> Optional[aug.Recipe]:
  """The augmentation recipe of a config's `dataset.augment` section (None: none)."""
  section = dataset_config.get("augment")
  if section is None:
    return None
  kw = dict(section)
  for k in ("crop_scale", "crop_ratio"):
    if k in kw:
      kw[k] = tuple(float(v) for v in kw[k])
  fields = {f for f in aug.Recipe.__dataclass_fields__}
  unknown = set(kw) - fields
  if unknown:
    raise KeyError(f"Unknown dataset.augment option(s) {sorted(unknown)}. "
                   f"Valid: {', '.join(sorted(fields))}.")
  return aug.Recipe(**kw)


def eval_batches(split: Split, batch_size: int, mean=MEAN_RGB, std=STD_RGB
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, padded to full batches.

  Args:
    split: the examples.
    batch_size: examples per batch; the last batch is padded up to it.
    mean: per-channel normalisation mean (uint8 scale).
    std: per-channel normalisation std (uint8 scale).

  Yields:
    dicts with `image` float32 [B, H, W, C], `label` int32 [B], `group`
    int32 [B] and `mask` float32 [B]: 1 for real examples, 0 for padding
    (padding repeats example 0, with label and group 0).
  """
  n = len(split)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    real = idx < n
    idx = np.where(real, idx, 0)
    yield {"image": normalize(split.images[idx], mean, std),
           "label": np.where(real, split.labels[idx], 0).astype(np.int32),
           "group": np.where(real, split.groups[idx], 0).astype(np.int32),
           "mask": real.astype(np.float32)}
