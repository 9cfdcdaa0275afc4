"""baq writes its splits itself: tfds's bytes, in generation order, one pass.

tfds's writer sends examples through its shuffler, which needs TensorFlow
beyond a 1 GB split; `baq.data.array_records` writes each example as it is
generated instead. These tests check that the files are the ones tfds's own
writer makes (records byte for byte, the same `dataset_info.json`), that
examples are stored in the order generated whatever their keys (no sorting
or shuffling step), across shards, and that each shard is on disk before the
next example is generated (memory holds one example, whatever the size).
"""

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from baq.data import array_records
from baq.data.synthetic import builder as synthetic_builder

TINY = dict(image_size=8, num_train=96, num_validation=16, num_test=16)
SPLITS = ("train", "validation", "test")


def _raw(builder, split):
  records = array_records.SplitRecords.of(builder, split)
  return records.raw(range(len(records)))


def test_prepared_files_are_those_of_tfds_own_writer(tmp_path):
  ours = synthetic_builder.make_builder(str(tmp_path / "baq"), **TINY)
  ours.download_and_prepare()
  tfds_made = synthetic_builder.make_builder(str(tmp_path / "tfds"), **TINY)
  tfds.core.GeneratorBasedBuilder.download_and_prepare(tfds_made)  # tfds's writer
  for split in SPLITS:
    got, want = _raw(ours, split), _raw(tfds_made, split)
    assert len(got) == TINY[f"num_{split}"] and len(set(got)) == len(got)
    assert got == want, split
  with open(os.path.join(ours.data_dir, "dataset_info.json")) as f:
    info = json.load(f)
  with open(os.path.join(tfds_made.data_dir, "dataset_info.json")) as f:
    assert info == json.load(f)
  assert [s["shardLengths"] for s in info["splits"]] == [["96"], ["16"], ["16"]]
  names = sorted(os.listdir(ours.data_dir))
  assert names == sorted(os.listdir(tfds_made.data_dir))  # nothing left behind
  assert not [p for p in os.listdir(os.path.dirname(ours.data_dir)) if "incomplete" in p]
  again = synthetic_builder.make_builder(str(tmp_path / "baq"), **TINY)
  again.download_and_prepare()  # prepared: nothing is rewritten
  assert sorted(os.listdir(again.data_dir)) == names
  assert again.info.splits["train"].num_examples == 96


def test_written_in_generation_order_across_shards_one_example_at_a_time(tmp_path):
  builder = synthetic_builder.make_builder(str(tmp_path), image_size=4, num_train=30,
                                           num_validation=1, num_test=1)
  order = np.random.default_rng(0).permutation(30)  # what `index` holds, in order
  shard_bytes, seen = 400, []
  part_dir = os.path.dirname(builder.data_dir)

  def examples():
    for n, i in enumerate(order):
      # Closed shards (and the open one) are already on disk as we generate.
      seen.append(sum(p.endswith(".part") for _, _, f in os.walk(part_dir) for p in f))
      # Keys run backwards: a sorting writer would store reversed order.
      yield 1000 - n, {"image": np.full((4, 4, 3), i, np.uint8), "label": i % 3,
                       "group": i % 6, "index": i,
                       "skin_lab": np.array([i, -i, 0.5], np.float32)}

  array_records.prepare(builder, {"train": examples()}, shard_bytes=shard_bytes)
  lengths = builder.info.splits["train"].shard_lengths
  assert len(lengths) > 3 and sum(lengths) == 30
  assert len(builder.info.splits["train"].filepaths) == len(lengths)
  # A shard closes at the first example that takes it past `shard_bytes`.
  sizes = [len(r) for r in _raw(builder, "train")]
  ends = np.cumsum(lengths)
  for start, end in zip(np.r_[0, ends[:-1]], ends):
    assert sum(sizes[start:end - 1]) < shard_bytes <= sum(sizes[start:end]) or end == 30
  # When example n is generated, examples 0..n-1 are in files already: the
  # shards holding them are on disk (the next one opens with example n).
  np.testing.assert_array_equal(seen, np.r_[0, np.searchsorted(ends, np.arange(29), "right") + 1])
  data = array_records.SplitRecords.of(builder, "train").read(range(30))
  np.testing.assert_array_equal(data["index"], order)
  np.testing.assert_array_equal(data["image"][:, 0, 0, 0], order)
  source = builder.as_data_source(split="train")  # tfds's public reader agrees
  assert [int(source[k]["index"]) for k in range(30)] == list(order)
  assert builder.info.splits.keys() == {"train"}  # splits without examples: no files
