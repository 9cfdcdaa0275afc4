"""The dataset registry and the in-memory split every trainer consumes.

A dataset is one function registered in `DATASETS` that returns a `Split`:
numpy images, labels and group ids plus the names behind them. Trainers and
evaluators call `load(name, split)` and never name a dataset themselves. The
real datasets register themselves in their modules of `baq.data.manual`,
which `DATASETS` imports the first time it is asked for a name.

    train = load('synthetic_derm', 'train', data_dir='/tmp/tfds')
    pairs = counterfactual_pairs('test', skin_types=(0, 5), indices=range(64))

`synthetic_derm` is the SYNTHETIC dermatology-like set of
`baq.data.synthetic.generate` (groups are Fitzpatrick skin types I-VI). It is written
once through its tfds builder and then read whole into memory from its
array_record files (`baq.data.array_records`); tensorflow-datasets is
imported only when it is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from baq.data import array_records, records
from baq.data.synthetic import generate as synthetic
from baq.registry import Registry

# The loaders of real datasets are one module each in `baq.data.manual`,
# imported on the first lookup, so a new dataset is one new file there (or a
# module of the user's own named in `config.imports`) and no other edit.
DATASETS: Registry[Callable[..., "Split"]] = Registry(
    "dataset", discover="baq.data.manual")


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset.

  Attributes:
    images: uint8 [n, H, W, C] images: an array, or (loaded with
      `stream=True`) `records.RecordImages`, which reads them when indexed.
    labels: int32 [n] class ids.
    groups: int32 [n] group ids (the attribute fairness is measured over).
    num_classes: number of classes.
    num_groups: number of groups.
    class_names: name of each class id.
    group_names: name of each group id.
    name: e.g. 'synthetic_derm/train'.
  """
  images: np.ndarray
  labels: np.ndarray
  groups: np.ndarray
  num_classes: int
  num_groups: int
  class_names: tuple[str, ...]
  group_names: tuple[str, ...]
  name: str

  def __len__(self) -> int:
    return len(self.labels)

  def subset(self, indices) -> "Split":
    """Returns the examples at `indices` (a numpy index), same metadata."""
    return dataclasses.replace(self, images=self.images[indices],
                               labels=self.labels[indices],
                               groups=self.groups[indices])


def load(name: str, split: str, data_dir: str | None = None, stream: bool = False,
         **kwargs) -> Split:
  """Loads one split of a registered dataset into memory.

  Args:
    name: a name registered in `DATASETS`, e.g. 'synthetic_derm'.
    split: split name, e.g. 'train', 'validation' or 'test'.
    data_dir: where prepared files live (dataset-specific default if None).
    **kwargs: dataset-specific options (for 'synthetic_derm' the arguments of
      `synthetic_builder.make_config`: image_size, num_train, ..., seed).
    stream: keep the images in the prepared records and read them when a
      batch is cut (`baq.data.records.RecordImages`): a split larger than
      memory loads. Datasets that are not read through `read_all` load whole.

  Returns:
    The `Split`.

  Raises:
    KeyError: `name` is not registered; the message lists the valid names.
  """
  loader = DATASETS.get(name)
  with records.load_streaming(stream), _quiet_tfds():
    return loader(split, data_dir=data_dir, **kwargs)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Hides tfds's warnings about builders baq configures itself ("Using custom
  data configuration" on every load, "Variant folder ... has no
  dataset_info.json" before the first preparation): they are no news, and
  `array_records.prepare` says in one line when a dataset is prepared."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  old = logging.get_verbosity()
  logging.set_verbosity(min(old, logging.ERROR))  # absl: lower is quieter
  try:
    yield
  finally:
    logging.set_verbosity(old)


def read_all(source: array_records.SplitRecords) -> dict[str, np.ndarray]:
  """Reads a whole prepared split into stacked numpy arrays.

  The records are read in one batched call (grain's `ArrayRecordDataSource`)
  and the fields pulled straight out of the `tf.train.Example` protos
  (`baq.data.tf_example`), ~6x faster than tfds's decoder at ~200 us an
  example; tests check both give the same arrays. Inside
  `records.load_streaming()` the images stay in the records
  (`records.RecordImages`).

  Args:
    source: `array_records.SplitRecords.of(builder, split)`.

  Returns:
    dict of feature name -> array with a leading example dimension, in
    record order.
  """
  if records.streaming():  # images stay in the records, read when indexed
    data, images = records.read_fields(source)
    return dict(data, image=images)
  return source.read(range(len(source)))


@DATASETS.register("synthetic_derm")
def load_synthetic_derm(split: str, data_dir: str | None = None,
                        **config_kwargs) -> Split:
  """Loads a split of the SYNTHETIC dermatology-like set, preparing it once.

  Args:
    split: 'train', 'validation' or 'test'.
    data_dir: tfds data root (default `synthetic_builder.DEFAULT_DATA_DIR`).
    **config_kwargs: `synthetic_builder.make_config` arguments.

  Returns:
    The `Split`, in generation order (example i has `index` i).
  """
  from baq.data.synthetic import builder as synthetic_builder  # Imports tfds: only when needed.
  builder = synthetic_builder.make_builder(data_dir, **config_kwargs)
  builder.download_and_prepare()  # A no-op once the files exist.
  data = read_all(array_records.SplitRecords.of(builder, split))
  order = np.argsort(data["index"], kind="stable")
  return Split(
      images=data["image"].take(order, axis=0),
      labels=data["label"][order].astype(np.int32),
      groups=data["group"][order].astype(np.int32),
      num_classes=len(synthetic.CLASS_NAMES),
      num_groups=len(synthetic.GROUP_NAMES),
      class_names=synthetic.CLASS_NAMES,
      group_names=synthetic.GROUP_NAMES,
      name=f"synthetic_derm/{split}",
  )


def counterfactual_pairs(split: str = "test",
                         skin_types: Sequence[int] = (0, 5),
                         indices: Iterable[int] | None = None,
                         skin_seed: int = 0, **config_kwargs) -> dict:
  """Renders the lesions of a synthetic_derm split on chosen skin types.

  The lesion records behind a split are a pure function of its config, so
  they are recreated from the seed, not read from disk; rendered on their
  original skin colours they give exactly the split's images. Here every
  selected lesion is rendered, with the same shape, texture and nuisances, on
  each of `skin_types`: images differ only through the skin colour and the
  skin-dependent contrast, which is what counterfactual calibration needs.

  Args:
    split: 'train', 'validation' or 'test'.
    skin_types: T Fitzpatrick type ids (0 = I ... 5 = VI).
    indices: which examples of the split (default: all of them).
    skin_seed: seeds the new skin colours (see `synthetic.counterfactuals`).
    **config_kwargs: `synthetic_builder.make_config` arguments; they must
      match those the split was loaded with.

  Returns:
    dict with `image` uint8 [T, n, H, W, 3], `skin_lab` float32 [T, n, 3],
    `label` int32 [n], `group` int32 [T] (the rendered skin types),
    `original_group` int32 [n] and `index` int [n] (positions in the split).
  """
  from baq.data.synthetic import builder as synthetic_builder  # Imports tfds: only when needed.
  config = synthetic_builder.make_config(**config_kwargs)
  groups, lesions, _ = synthetic_builder.split_records(config, split)
  index = (np.arange(len(groups)) if indices is None
           else np.asarray(list(indices), np.int64))
  out = synthetic.counterfactuals(lesions.take(index), skin_types,
                                  seed=skin_seed, image_size=config.image_size)
  out.update(original_group=groups[index], index=index)
  return out
