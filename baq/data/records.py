"""Images read from a split's records on demand, not held in memory.

`RecordImages` stands where a `Split`'s uint8 image array would: it has the
array's `shape`, `dtype` and `len`, and indexing it (an int, a slice or an
integer array) reads just those examples from the split's array_record files
(`baq.data.array_records.SplitRecords`).
`take(order)` re-orders it without reading anything. Whatever cuts batches
from `split.images` (the batcher, evaluation, export) then works on a split
larger than memory, reading each batch when it is needed.

`CroppedImages` is a view of the same kind (both are `LazyImages`) over any
images (an array or `RecordImages`): each read is centre-cropped (`augment.center_crop`) and
rounded back to uint8 on the way out, so centre-crop evaluation of a
streamed split reads one batch at a time as well.

`load_streaming()` is the switch: inside it, `baq.data.datasets.read_all`
returns `RecordImages` for the image feature (the other fields are read, a
chunk of records at a time, and kept).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Optional

import numpy as np

from baq.data import array_records, augment

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


class LazyImages:
  """What a lazy image view shares: the array's `shape`, `dtype`, `ndim`,
  `nbytes` and `len`, and indexing (an int, a slice, an integer array, or
  a tuple whose first entry picks examples). A subclass sets `shape` and
  `dtype` and reads the examples an index picks (`_rows`), and re-orders
  itself without reading (`_reordered`).
  """

  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    """What the images would take in memory (none of it is held)."""
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def __len__(self) -> int:
    return self.shape[0]

  def _rows(self, index) -> np.ndarray:
    raise NotImplementedError

  def _reordered(self, order: np.ndarray) -> "LazyImages":
    raise NotImplementedError

  def take(self, order, axis: int = 0) -> "LazyImages":
    """The same images in `order` (nothing is read)."""
    if axis != 0:
      raise ValueError(f"{type(self).__name__} can only be re-ordered along the example axis.")
    return self._reordered(np.asarray(order))

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, tuple):  # images[examples, ...]: read, then index the rest
      head, rest = index[0], index[1:]
      out = self[head]
      return out[(slice(None),) + rest] if out.ndim == self.ndim else out[rest]
    if isinstance(index, (int, np.integer)):
      return self._rows(np.array([int(index)]))[0]
    return self._rows(index)

  def astype(self, dtype) -> np.ndarray:
    """Every image, read (the whole split in memory)."""
    return np.asarray(self).astype(dtype)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out = np.empty(self.shape, self.dtype)
    for start in range(0, len(self), CHUNK):  # a chunk of examples at a time
      out[start:start + CHUNK] = self[start:start + CHUNK]
    return out if dtype is None else out.astype(dtype)


class RecordImages(LazyImages):
  """A split's images, read from its records when indexed.

  Pickles with its records, so worker processes can read batches.

  Args:
    source: the split's `array_records.SplitRecords`.
    positions: int [n], the record behind each image, in order.
    feature: the image feature's name.
  """

  def __init__(self, source: array_records.SplitRecords, positions: np.ndarray,
               feature: str = "image"):
    self._source = source
    self._positions = np.asarray(positions, np.int64)
    self._feature = feature
    self.dtype, self._item_shape = source.specs[feature]

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self._positions),) + self._item_shape

  def _reordered(self, order: np.ndarray) -> "RecordImages":
    return RecordImages(self._source, self._positions[order], self._feature)

  def _rows(self, index) -> np.ndarray:
    return self._read(self._positions[index])

  def _read(self, positions: np.ndarray) -> np.ndarray:
    return self._source.read(positions, [self._feature])[self._feature]


class CroppedImages(LazyImages):
  """Images whose reads come back centre-cropped, as uint8 (see the module docstring).

  `augment.center_crop(images, fraction)`, rounded and clipped to uint8, of
  whatever is read: an example's pixels do not depend on what else is read
  with it, so any batch equals those rows of the whole split cropped at
  once. Nothing is read or cropped until indexed.

  Args:
    images: uint8 [n, H, W, C] images, an array or `RecordImages`.
    fraction: the central fraction of each side kept, in (0, 1].
  """

  def __init__(self, images: Any, fraction: float):
    if not 0 < fraction <= 1:
      raise ValueError(f"center crop fraction={fraction} must lie in (0, 1].")
    self._images, self.fraction = images, float(fraction)
    self.dtype, self.shape = np.dtype(np.uint8), tuple(images.shape)

  def _reordered(self, order: np.ndarray) -> "CroppedImages":
    return CroppedImages(self._images.take(order, axis=0), self.fraction)

  def _rows(self, index) -> np.ndarray:
    out = augment.center_crop(np.asarray(self._images[index]), self.fraction)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def center_cropped(images: Any, fraction: Optional[float]) -> Any:
  """`images` centre-cropped on every read (None or 1: `images` itself).

  The one place evaluation's centre crop is applied: lazy images
  (`RecordImages`) stay lazy behind a `CroppedImages` view; an in-memory
  array is cropped once, through the same view, a chunk at a time.

  Args:
    images: uint8 [n, H, W, C], an array or a lazy view.
    fraction: the central fraction of each side kept.

  Returns:
    uint8 images of the same shape: an array for an array, else a view.
  """
  if fraction is None or fraction == 1:
    return images
  view = CroppedImages(images, fraction)
  return np.asarray(view) if isinstance(images, np.ndarray) else view


def read_fields(source: array_records.SplitRecords, skip: str = "image"
                ) -> tuple[dict[str, np.ndarray], RecordImages]:
  """Every feature but `skip`, read a chunk of records at a time, and `skip` lazily.

  Args:
    source: the split's records.
    skip: the feature left in the records (the images).

  Returns:
    (name -> stacked array of every other feature, `RecordImages` of `skip`).
  """
  names = [k for k in source.specs if k != skip]
  n = len(source)
  chunks = [source.read(range(start, min(n, start + CHUNK)), names)
            for start in range(0, n, CHUNK)] or [source.read([], names)]
  out = {k: np.concatenate([c[k] for c in chunks]) for k in names}
  return out, RecordImages(source, np.arange(n), skip)
