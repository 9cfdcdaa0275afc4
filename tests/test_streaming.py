"""The streaming input path: images read from the records, batches made in workers."""

import os
import pickle

import jax
import numpy as np
import pytest

from baq.data import augment, datasets, records
from baq.data.pipeline import Batcher, batches, eval_batches
from baq.models import build_model
from baq.experiment import job as experiment
from baq.train import sharding, loop as trainer
from baq.train.evaluate import evaluate_split
from baq.train.checkpoint import restore_variables


@pytest.fixture(scope="module")
def both(make_tiny_config):
  """The tiny train split in memory and streamed."""
  c = make_tiny_config()
  kw = dict(data_dir=c.dataset.data_dir, **c.dataset.kwargs.to_dict())
  return (datasets.load(c.dataset.name, "train", **kw),
          datasets.load(c.dataset.name, "train", stream=True, **kw))


def test_streamed_split_reads_the_same_examples_and_holds_no_images(both):
  mem, lazy = both
  assert isinstance(lazy.images, records.RecordImages) and isinstance(mem.images, np.ndarray)
  assert lazy.images.shape == mem.images.shape and lazy.images.dtype == mem.images.dtype
  np.testing.assert_array_equal(lazy.labels, mem.labels)
  np.testing.assert_array_equal(lazy.groups, mem.groups)
  idx = np.array([5, 0, 77, 3, 3, len(mem) - 1])
  for index in (idx, slice(10, 20), 7, (slice(0, 4), slice(None, None, -1))):
    np.testing.assert_array_equal(lazy.images[index], mem.images[index])
  np.testing.assert_array_equal(lazy.images.take(idx)[1:3], mem.images[idx][1:3])
  np.testing.assert_array_equal(lazy.subset(idx).images, mem.images[idx])
  # It pickles with its data source (what worker processes receive), small.
  again = pickle.loads(pickle.dumps(lazy.images))
  np.testing.assert_array_equal(again[idx], mem.images[idx])
  assert len(pickle.dumps(lazy.images)) < mem.images.nbytes / 4


def test_a_hosts_rows_are_those_rows_of_the_global_batch(both):
  """On several hosts each reads its rows only, with the same flips and
  augmentation draws as the global batch (seeded by the global position)."""
  mem, lazy = both
  kw = dict(seed=2, flip=True, augment=augment.PAPER_RECIPE, sampling="group_balanced")
  full = Batcher(mem, 16, **kw).batch(3)
  rows = np.array([4, 5, 6, 7, 12, 13])
  part = Batcher(lazy, 16, rows=rows, **kw).batch(3)
  for k in full:
    np.testing.assert_array_equal(part[k], full[k][rows], err_msg=k)


def test_worker_processes_make_the_same_batches_in_order(both):
  mem, lazy = both
  b = Batcher(lazy, 8, seed=1, flip=True, augment=augment.PAPER_RECIPE)
  want = [Batcher(mem, 8, seed=1, flip=True, augment=augment.PAPER_RECIPE).batch(s)
          for s in range(3, 9)]
  got = list(batches(b, 3, 9, workers=2))
  assert len(got) == len(want)
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k])


def test_streamed_centre_crop_evaluation_is_lazy_and_equals_the_in_memory_one(
    make_tiny_config, monkeypatch):
  """`dataset.eval_center_crop` on a streamed split crops each batch as it is
  read (no image is read when the data load, none but a batch's at a time
  later) and gives the in-memory path's batches and metrics exactly."""
  reads = []
  original = records.RecordImages._read
  monkeypatch.setattr(records.RecordImages, "_read",
                      lambda self, p: reads.append(len(p)) or original(self, p))
  crop = {"dataset.eval_center_crop": 0.75}
  mem = experiment.load_data(make_tiny_config(**crop))
  lazy = experiment.load_data(make_tiny_config(**crop, **{"dataset.stream": True}))
  assert reads == []
  for k in ("validation", "test"):
    assert isinstance(lazy[k].images, records.CroppedImages)
    assert isinstance(mem[k].images, np.ndarray) and mem[k].images.dtype == np.uint8
    assert lazy[k].images.shape == mem[k].images.shape
  test, batch = mem["test"], 48
  # The in-memory crop is the reference's: centre crop, rounded to uint8.
  c = make_tiny_config()
  raw = datasets.load(c.dataset.name, c.dataset.test_split, data_dir=c.dataset.data_dir,
                      **c.dataset.kwargs.to_dict())
  want = np.clip(np.round(augment.center_crop(raw.images, 0.75)), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(test.images, want)
  assert not np.array_equal(test.images, raw.images)
  got = list(eval_batches(lazy["test"], batch))
  assert max(reads) == batch and sum(reads) == batch * len(got)  # a batch per read
  for g, w in zip(got, eval_batches(test, batch)):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)
  idx = np.array([3, 0, 100, 3])
  np.testing.assert_array_equal(lazy["test"].images[idx], test.images[idx])
  np.testing.assert_array_equal(lazy["test"].images[-1], test.images[-1])
  np.testing.assert_array_equal(lazy["test"].images.take(idx)[1:3], test.images[idx][1:3])
  np.testing.assert_array_equal(np.asarray(lazy["validation"].images), mem["validation"].images)
  model = build_model(c.model.name, test.num_classes, None, **c.model.kwargs.to_dict())
  variables = model.init(jax.random.key(0), np.zeros((1,) + test.images.shape[1:], np.float32))
  a, b = (evaluate_split(model, variables, d["test"], batch) for d in (mem, lazy))
  assert a == b and 0 < a["accuracy"] < 1


class Preempted(Exception):
  pass


def test_streamed_training_equals_in_memory_training_and_resumes_exactly(
    tmp_path, make_tiny_config, monkeypatch):
  """BAQ on the streamed split with two workers ends bit for bit where the
  in-memory run ends, also when it is killed after step 5 and resumed."""
  base = make_tiny_config(checkpoint_every=3)
  stream = make_tiny_config(checkpoint_every=3, **{"dataset.stream": True, "dataset.workers": 2})
  def run(config, workdir):
    return trainer.train(config, workdir, mode="baq", data=experiment.load_data(config),
                         steps=8, lr=1e-3)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  run(base, a)
  original, calls = sharding.shard_local_batch, []

  def preempt(*args, **kwargs):
    calls.append(1)
    if len(calls) == 6:
      raise Preempted
    return original(*args, **kwargs)

  monkeypatch.setattr(sharding, "shard_local_batch", preempt)
  with pytest.raises(Preempted):
    run(stream, b)
  assert sorted(os.listdir(os.path.join(b, "checkpoints"))) == ["3"]
  monkeypatch.setattr(sharding, "shard_local_batch", original)
  run(stream, b)
  va, vb = restore_variables(a), restore_variables(b)
  for x, y in zip(jax.tree_util.tree_leaves(va), jax.tree_util.tree_leaves(vb)):
    np.testing.assert_array_equal(x, y)
