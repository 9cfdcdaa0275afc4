"""baq's own `tf.train.Example` decoding equals tfds's public decoder.

`baq.data.tf_example` builds the Example message from TensorFlow's published
schema and decodes tfds `Tensor` features itself; here every field of every
record of the synthetic set and of a manual dataset (CelebA, with a uint8
[40] attribute vector stored as an int64 list) is compared, value and dtype,
with `builder.as_data_source(split)[i]` and
`features.deserialize_example_np`.
"""

import glob
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from baq.data import array_records, tf_example
from baq.data.manual import celeba
import test_manual_files

celeba_dir_fixture = test_manual_files._celeba_dir  # `celeba_dir`, shared with that file

TINY = dict(image_size=8, num_train=40, num_validation=8, num_test=8, seed=2)


def _check_against_tfds(builder, split):
  """Every field of `split` read by baq equals tfds's decoding; returns n."""
  ours = array_records.SplitRecords.of(builder, split)
  n = len(ours)
  data = ours.read(range(n))
  theirs = builder.as_data_source(split=split)
  assert len(theirs) == n and sorted(data) == sorted(builder.info.features.keys())
  raws = ours.raw(range(n))
  for i in range(n):
    want = theirs[i]
    also = builder.info.features.deserialize_example_np(raws[i])
    for k, v in data.items():
      assert v.dtype == np.asarray(want[k]).dtype, k
      np.testing.assert_array_equal(v[i], want[k])
      np.testing.assert_array_equal(v[i], also[k])
  return n


def test_synthetic_records_decode_as_tfds_decodes_them(tmp_path):
  from baq.data.synthetic import builder as synthetic_builder
  builder = synthetic_builder.make_builder(str(tmp_path), **TINY)
  builder.download_and_prepare()
  counts = {s: _check_against_tfds(builder, s) for s in ("train", "validation", "test")}
  assert counts == {"train": 40, "validation": 8, "test": 8}
  data = array_records.SplitRecords.of(builder, "train").read([5, 0, 5], ["index", "skin_lab"])
  np.testing.assert_array_equal(data["index"], [5, 0, 5])
  assert data["skin_lab"].dtype == np.float32 and data["skin_lab"].shape == (3, 3)


def test_manual_records_decode_as_tfds_decodes_them(celeba_dir, tmp_path):
  manual_dir, _, attrs = celeba_dir
  data_dir = str(tmp_path / "tfds")
  celeba.load_celeba("train", data_dir=data_dir, manual_dir=manual_dir, image_size=8)
  (info,) = glob.glob(os.path.join(data_dir, "**", "dataset_info.json"), recursive=True)
  builder = tfds.builder_from_directory(os.path.dirname(info))  # tfds reads it as its own
  assert builder.info.features["attributes"].np_dtype == np.uint8
  counts = {s: _check_against_tfds(builder, s) for s in ("train", "validation", "test")}
  assert counts == {"train": 5, "validation": 5, "test": 5}
  test = array_records.SplitRecords.of(builder, "test").read(range(5))
  rows = test["index"]
  np.testing.assert_array_equal(rows, [2, 5, 8, 11, 14])  # partition i % 3 == 2
  np.testing.assert_array_equal(test["attributes"], attrs[rows] > 0)


def test_message_class_reads_what_tfds_serializes():
  features = tfds.features.FeaturesDict({
      "a": tfds.features.Tensor(shape=(2, 3), dtype=np.int16),
      "b": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "c": tfds.features.Tensor(shape=(2,), dtype=np.float32),
      "d": tfds.features.Tensor(shape=(3, 1), dtype=np.uint8,
                                encoding=tfds.features.Encoding.BYTES)})
  examples = [dict(a=np.arange(6, dtype=np.int16).reshape(2, 3) - 3 * i, b=bool(i % 2),
                   c=np.array([0.1, -2.5], np.float32) * i,
                   d=np.array([[255], [0], [i]], np.uint8)) for i in range(3)]
  raws = [features.serialize_example(e) for e in examples]
  proto = tf_example.parse(raws[1])
  assert proto.features.feature["a"].int64_list.value == [-3, -2, -1, 0, 1, 2]
  assert proto.features.feature["d"].bytes_list.value == [bytes([255, 0, 1])]
  data = tf_example.decode(raws, tf_example.specs(features))
  for k in features.keys():
    want = np.stack([features.deserialize_example_np(r)[k] for r in raws])
    assert data[k].dtype == want.dtype and data[k].shape == (3,) + features[k].shape
    np.testing.assert_array_equal(data[k], want)
  np.testing.assert_array_equal(data["b"], [False, True, False])
  empty = tf_example.decode([], tf_example.specs(features), ["d"])
  assert empty["d"].shape == (0, 3, 1) and empty["d"].dtype == np.uint8


def test_specs_refuse_what_they_cannot_decode():
  zlib = tfds.features.FeaturesDict({"z": tfds.features.Tensor(
      shape=(2,), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)})
  ragged = tfds.features.FeaturesDict({"r": tfds.features.Tensor(
      shape=(None,), dtype=np.int64)})
  for features in (zlib, ragged):
    with pytest.raises(ValueError, match="static-shape Tensor"):
      tf_example.specs(features)
