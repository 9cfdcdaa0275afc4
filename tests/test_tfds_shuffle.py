"""Splits over tfds's shuffle buffer prepare without TensorFlow, in the in-memory order."""

import importlib.util

import numpy as np
import pytest

from baq.data import tfds_shuffle

TINY = dict(image_size=8, num_train=96, num_validation=16, num_test=16)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="with TensorFlow tfds's own buckets are used")
def test_spilled_buckets_write_the_in_memory_order(tmp_path, monkeypatch):
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel
  from baq.data.synthetic import builder as synthetic_builder  # pylint: disable=import-outside-toplevel

  def records(data_dir):
    b = synthetic_builder.make_builder(str(data_dir), **TINY)
    b.download_and_prepare()
    source = b.as_data_source(split="train")
    return [bytes(r) for r in source.data_source.__getitems__(list(range(len(source))))]

  assert tfds_shuffle.use_local_buckets()
  in_memory = records(tmp_path / "mem")
  added = []
  original = shuffle._Bucket.add  # pylint: disable=protected-access
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)  # spill after ~1 kB
  monkeypatch.setattr(shuffle._Bucket, "add",  # pylint: disable=protected-access
                      lambda self, k, d: added.append(len(d)) or original(self, k, d))
  spilled = records(tmp_path / "spill")
  assert len(added) >= TINY["num_train"] - 20  # nearly every example went through a bucket
  assert spilled == in_memory and len(spilled) == TINY["num_train"]
  assert len(set(spilled)) == len(spilled)  # distinct examples, none duplicated or lost
  assert not list((tmp_path / "spill").rglob("bucket_*.tmp"))  # buckets removed
  assert np.all([len(r) > 0 for r in spilled])
