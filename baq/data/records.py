"""Images read from a split's records on demand, not held in memory.

`RecordImages` stands where a `Split`'s uint8 image array would: it has the
array's `shape`, `dtype` and `len`, and indexing it (an int, a slice or an
integer array) reads just those examples from the tfds array_record files.
`take(order)` re-orders it without reading anything. Whatever cuts batches
from `split.images` (the batcher, evaluation, export) then works on a split
larger than memory, reading each batch when it is needed.

`load_streaming()` is the switch: inside it, `baq.data.datasets.read_all`
returns `RecordImages` for the image feature (the other fields are read, a
chunk of records at a time, and kept).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import numpy as np

_STREAMING = contextvars.ContextVar("baq_streaming", default=False)
CHUNK = 1024  # records parsed per read while collecting the small fields


@contextlib.contextmanager
def load_streaming(on: bool = True) -> Iterator[None]:
  """Within this context, loaders keep images in their records (`RecordImages`)."""
  token = _STREAMING.set(bool(on))
  try:
    yield
  finally:
    _STREAMING.reset(token)


def streaming() -> bool:
  return _STREAMING.get()


def example_parser():
  """`tf.train.Example` parsing, from tfds's bundled protos (no TensorFlow)."""
  from tensorflow_datasets.core import example_parser  # pylint: disable=import-outside-toplevel
  return example_parser.tf_example_pb2.Example.FromString


def feature_array(values, dtype, shape) -> np.ndarray:
  """One feature of many `tf.train.Example` protos, stacked into an array."""
  kind = values[0].WhichOneof("kind")
  if kind == "bytes_list":  # Tensors stored with Encoding.BYTES
    flat = np.frombuffer(b"".join(v.bytes_list.value[0] for v in values), dtype)
  else:
    flat = np.array([getattr(v, kind).value for v in values], dtype)
  return flat.reshape((len(values),) + tuple(shape))


class RecordImages:
  """A split's images, read from its records when indexed.

  Pickles with its data source, so worker processes can read batches.
  """

  def __init__(self, source: Any, positions: np.ndarray, feature: str = "image"):
    self._source = source
    self._positions = np.asarray(positions, np.int64)
    spec = source.dataset_info.features[feature]
    self._feature, self.dtype = feature, np.dtype(spec.np_dtype)
    self._item_shape = tuple(spec.shape)

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self._positions),) + self._item_shape

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """What the images would take in memory (none of it is held)."""
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def __len__(self) -> int:
    return len(self._positions)

  def take(self, order, axis: int = 0) -> "RecordImages":
    """The same images in `order` (nothing is read)."""
    if axis != 0:
      raise ValueError("RecordImages can only be re-ordered along the example axis.")
    return RecordImages(self._source, self._positions[np.asarray(order)], self._feature)

  def _read(self, positions: np.ndarray) -> np.ndarray:
    if len(positions) == 0:
      return np.zeros((0,) + self._item_shape, self.dtype)
    parse = example_parser()
    raw = self._source.data_source.__getitems__([int(p) for p in positions])
    values = [parse(r).features.feature[self._feature] for r in raw]
    return feature_array(values, self.dtype, self._item_shape)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, tuple):  # images[examples, ...]: read, then index the rest
      head, rest = index[0], index[1:]
      out = self[head]
      return out[(slice(None),) + rest] if out.ndim == self.ndim else out[rest]
    if isinstance(index, (int, np.integer)):
      return self._read(self._positions[[int(index)]])[0]
    return self._read(self._positions[index])

  def astype(self, dtype) -> np.ndarray:
    """Every image, read (the whole split in memory)."""
    return np.asarray(self).astype(dtype)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = self[:]
    return out if dtype is None else out.astype(dtype)


def read_fields(source, skip: str = "image") -> tuple[dict[str, np.ndarray], RecordImages]:
  """Every feature but `skip`, read a chunk of records at a time, and `skip` lazily."""
  parse = example_parser()
  features = source.dataset_info.features
  names = [k for k in features.keys() if k != skip]
  cols: dict[str, list] = {k: [] for k in names}
  n = len(source)
  for start in range(0, n, CHUNK):
    raw = source.data_source.__getitems__(list(range(start, min(n, start + CHUNK))))
    protos = [parse(r).features.feature for r in raw]
    for k in names:
      cols[k].append(feature_array([p[k] for p in protos], features[k].np_dtype,
                                    features[k].shape))
  out = {k: np.concatenate(v) if v else np.zeros((0,) + tuple(features[k].shape),
                                                   features[k].np_dtype)
         for k, v in cols.items()}
  return out, RecordImages(source, np.arange(n), skip)
