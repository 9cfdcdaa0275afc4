"""Preparing a split larger than tfds's shuffle buffer, without TensorFlow.

tfds shuffles the examples of a split while writing it, in memory up to
`shuffle.MAX_MEM_BUFFER_SIZE` (1 GB) and beyond that through temporary
bucket files written with `tf.io.gfile`: preparing any split over 1 GB
failed with `No module named 'tensorflow'` (found preparing a 1.7 GB
synthetic split for the streaming benchmark). baq installs no TensorFlow,
so `use_local_buckets()` swaps tfds's bucket class for one that writes the
same records (8-byte key, 8-byte size, data) with plain local files. The
buckets are ranges of the hashed key and each is read back sorted, so the
written order is the in-memory path's, example for example (tested).

Called by baq's builders before `download_and_prepare`; a no-op where
TensorFlow is installed (tfds's own buckets then work, on any filesystem).
"""

from __future__ import annotations

import importlib.util
import os
import struct

_installed = False


def use_local_buckets() -> bool:
  """Installs the local-file buckets once; False where TensorFlow is present."""
  global _installed
  if _installed:
    return True
  if importlib.util.find_spec("tensorflow") is not None:
    return False
  from tensorflow_datasets.core import shuffle  # pylint: disable=import-outside-toplevel

  class LocalBucket(shuffle._Bucket):  # pylint: disable=protected-access
    """tfds's bucket, with Python files for tf.io.gfile (local paths only)."""

    def add(self, key, data: bytes) -> None:
      if not self._fobj:
        os.makedirs(os.path.dirname(os.fspath(self._path)), exist_ok=True)
        self._fobj = open(os.fspath(self._path), "wb")  # pylint: disable=consider-using-with
      self._fobj.write(shuffle._hkey_to_bytes(key))  # pylint: disable=protected-access
      self._fobj.write(struct.pack("=Q", len(data)))
      self._fobj.write(data)
      self._length += 1
      self._size += len(data)

    def read_values(self):
      self.flush()
      path = os.fspath(self._path)
      if not os.path.exists(path):  # a bucket nothing was added to
        return
      with open(path, "rb") as f:
        while buff := f.read(shuffle.HKEY_SIZE_BYTES):
          size = struct.unpack("=Q", f.read(8))[0]
          yield shuffle._read_hkey(buff), f.read(size)  # pylint: disable=protected-access

    def del_file(self) -> None:
      if os.path.exists(os.fspath(self._path)):
        os.remove(os.fspath(self._path))

  shuffle._Bucket = LocalBucket  # pylint: disable=protected-access
  _installed = True
  return True
