"""Tests of the stateless batcher and the padded evaluation batches.

The fake split stores each example's index in its first two pixel values, so
a batch can be decoded back to the examples it holds.
"""

import numpy as np
import pytest

from baq.data import pipeline
from baq.data.datasets import Split


def _split(n=103, probs=(.184, .300, .207, .174, .096, .040), seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
  images[:, 0, 0, 0] = np.arange(n) % 256
  images[:, 0, 0, 1] = np.arange(n) // 256
  groups = rng.choice(len(probs), n, p=np.asarray(probs) / sum(probs))
  return Split(images=images, labels=(np.arange(n) % 3).astype(np.int32),
               groups=groups.astype(np.int32), num_classes=3,
               num_groups=len(probs), class_names=("a", "b", "c"),
               group_names=tuple(map(str, range(len(probs)))), name="fake")


def _decode(batch):
  """Example indices of a batch, read back from the normalised pixels."""
  mean, std = np.array(pipeline.MEAN_RGB), np.array(pipeline.STD_RGB)
  pix = np.rint(batch["image"][:, 0, 0, :2] * std[:2] + mean[:2]).astype(int)
  return pix[:, 0] + 256 * pix[:, 1]


def test_same_step_same_batch_even_from_a_fresh_batcher():
  split = _split()
  a = pipeline.Batcher(split, 10, seed=5)
  for step in (0, 3, 17, 1000):
    b = pipeline.Batcher(split, 10, seed=5).batch(step)  # "Resumed" run.
    for key, value in a.batch(step).items():
      np.testing.assert_array_equal(value, b[key])
  assert not np.array_equal(_decode(a.batch(0)), _decode(a.batch(1)))
  other_seed = pipeline.Batcher(split, 10, seed=6)
  assert not np.array_equal(_decode(a.batch(0)), _decode(other_seed.batch(0)))


def test_batch_contents_types_and_normalisation():
  split = _split()
  batch = pipeline.Batcher(split, 16, seed=0).batch(2)
  assert batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["group"].dtype == np.int32
  assert batch["image"].shape == (16, 8, 8, 3)
  idx = _decode(batch)
  np.testing.assert_array_equal(batch["label"], split.labels[idx])
  np.testing.assert_array_equal(batch["group"], split.groups[idx])
  expected = (split.images[idx].astype(np.float32) - pipeline.MEAN_RGB) / (
      pipeline.STD_RGB)
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-6)


def test_each_epoch_visits_every_example_once():
  split = _split(n=100)
  batcher = pipeline.Batcher(split, 10, seed=1)
  assert batcher.steps_per_epoch == 10
  epochs = [np.concatenate([_decode(batcher.batch(e * 10 + s))
                            for s in range(10)]) for e in range(2)]
  for seen in epochs:
    np.testing.assert_array_equal(np.sort(seen), np.arange(100))
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled per epoch.
  # The epoch permutation is the documented one.
  perm = np.random.default_rng([1, 1]).permutation(100)
  np.testing.assert_array_equal(epochs[1], perm)


def test_drop_remainder():
  split = _split(n=103)
  dropped = pipeline.Batcher(split, 10, seed=0)
  assert dropped.steps_per_epoch == 10
  seen = np.concatenate([_decode(dropped.batch(s)) for s in range(10)])
  assert len(np.unique(seen)) == 100
  kept = pipeline.Batcher(split, 10, seed=0, drop_remainder=False)
  assert kept.steps_per_epoch == 11
  assert kept.batch(10)["label"].shape == (3,)
  seen = np.concatenate([_decode(kept.batch(s)) for s in range(11)])
  np.testing.assert_array_equal(np.sort(seen), np.arange(103))


def test_group_balanced_draws_groups_uniformly():
  split = _split(n=2000)
  assert np.mean(split.groups == 5) < 0.06  # The rare group really is rare.
  batcher = pipeline.Batcher(split, 128, seed=0, sampling="group_balanced")
  batches = [batcher.batch(s) for s in range(100)]
  groups = np.concatenate([b["group"] for b in batches])
  freq = np.bincount(groups, minlength=6) / len(groups)
  np.testing.assert_allclose(freq, np.full(6, 1 / 6), atol=0.015)
  # Each drawn example really belongs to the group it reports.
  idx = np.concatenate([_decode(b) for b in batches])
  np.testing.assert_array_equal(split.groups[idx], groups)
  # Within a group, examples are drawn uniformly: most of group 5 is seen.
  assert len(np.unique(idx[groups == 5])) > 0.9 * np.sum(split.groups == 5)
  np.testing.assert_array_equal(batcher.batch(7)["group"],
                                batches[7]["group"])


def test_flip_is_deterministic_and_flips_about_half():
  split = _split()
  plain = pipeline.Batcher(split, 64, seed=2, drop_remainder=False)
  flip = pipeline.Batcher(split, 64, seed=2, drop_remainder=False, flip=True)
  a, b = plain.batch(0)["image"], flip.batch(0)["image"]
  flipped = np.array([not np.array_equal(x, y) for x, y in zip(a, b)])
  assert 0.25 < flipped.mean() < 0.75
  np.testing.assert_array_equal(b[flipped], a[flipped][:, :, ::-1])
  np.testing.assert_array_equal(flip.batch(0)["image"], b)


def test_eval_batches_cover_everything_once_with_mask():
  split = _split(n=103)
  batches = list(pipeline.eval_batches(split, 32))
  assert len(batches) == 4
  assert all(b["image"].shape == (32, 8, 8, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(128) < 103)
  idx = np.concatenate([_decode(b) for b in batches])[:103]
  np.testing.assert_array_equal(idx, np.arange(103))
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[:103], split.labels)
  assert np.all(labels[103:] == 0)


def test_bad_arguments_raise():
  split = _split(n=20)
  with pytest.raises(ValueError, match="sampling"):
    pipeline.Batcher(split, 4, sampling="balanced")
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.Batcher(split, 32)
  with pytest.raises(ValueError, match="step"):
    pipeline.Batcher(split, 4).batch(-1)


def test_normalize_is_the_per_channel_formula_bit_for_bit():
  """The row-tiled constants change the loop, not the values."""
  mean, std = np.float32(pipeline.MEAN_RGB), np.float32(pipeline.STD_RGB)
  x = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3)).astype(np.uint8)
  for im in (x, x.astype(np.float32) / 3, x.astype(np.float64) + 0.1, x[:, ::2, ::-1], x[0, 0, 0]):
    got = pipeline.normalize(im)
    assert got.dtype == np.float32 and got.shape == im.shape
    np.testing.assert_array_equal(got, (im.astype(np.float32) - mean) / std)
  got = pipeline.normalize(x, mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 8.0))
  np.testing.assert_array_equal(got[..., 2], (x[..., 2] - np.float32(3)) / np.float32(8))
