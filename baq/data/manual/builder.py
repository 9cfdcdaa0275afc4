"""Shared pieces of the real-dataset loaders: manual files in, tfds files out.

Real datasets cannot be downloaded at run time: the user places the official
files in a *manual directory* and names it in the config
(`dataset.kwargs.manual_dir`). Each dataset module reads that directory with
`baq.data.manual.files` into a `Table` (image paths, per-example fields,
split assignment, names), and this module does the rest: `load_table` writes a
`Table` once through a tensorflow-datasets builder (plain `Tensor` features,
array_record files written by `baq.data.array_records`, no TensorFlow) and
reads a split back; `register_manual` turns a dataset module's table function
into a registered loader, so a new dataset is one file and one call.

tensorflow-datasets is imported only when a builder class is made (in
`load_table`), so that `import baq.data` stays light.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import os
from typing import Callable, NamedTuple, Sequence

import numpy as np

from baq.data import array_records, datasets, tf_example
from baq.data.datasets import Split
from baq.data.manual.files import SPLITS, assign_splits, choose, load_image, require

DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")


class Table(NamedTuple):
  """Everything a builder needs to write a dataset, before images are read.

  Attributes:
    paths: image file of each example, in `index` order.
    splits: int [n] split of each example, an index into `SPLITS`.
    fields: per-example arrays stored beside the image, e.g. {'label': [n]}.
    metadata: JSON-able facts kept with the prepared files (class_names,
      group_names, ...), read back without the manual directory.
  """
  paths: list
  splits: np.ndarray
  fields: dict
  metadata: dict


def labelled_table(paths: list, keep, units, labels, groups, options: dict,
                   **metadata) -> Table:
  """The Table of the kept examples, split so that each unit stays in one split.

  Args:
    paths: every candidate's image file.
    keep: bool per candidate (`files.find_missing_images`).
    units: per kept example, what must share a split (a lesion, an image).
    labels: int per kept example.
    groups: int per kept example.
    options: the loader's options (`fractions` and `seed` of the split).
    **metadata: kept with the prepared files (class_names, group_names, ...).
  """
  labels, groups = np.asarray(labels, np.int64), np.asarray(groups, np.int64)
  splits = assign_splits(units, groups, labels, options["fractions"], options["seed"])
  return Table(paths=[p for p, k in zip(paths, keep) if k], splits=splits,
               fields={"label": labels, "group": groups}, metadata=metadata)


def config_name(prefix: str, image_size: int, manual_dir: str,
                options: dict) -> str:
  """A builder-config name unique to everything that shapes the files.

  The readable part gives the dataset and image size; a digest of the options
  and the manual directory makes sure different settings never share a
  prepared directory.
  """
  blob = json.dumps([image_size, manual_dir, options], sort_keys=True)
  digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
  return f"{prefix}_s{image_size}_{digest}"


def load_table(name: str, split: str, table_fn, fields: dict,
               data_dir: str | None, manual_dir: str, image_size: int,
               options: dict, center_crop: bool = False,
               description: str = "") -> tuple[dict, dict]:
  """Prepares a dataset once (from `table_fn()`) and reads one split.

  Args:
    name: tfds builder name, e.g. 'baq_isic2019'.
    split: 'train', 'validation' or 'test'.
    table_fn: () -> `Table`; called only when the files are not yet prepared.
    fields: field name -> (shape, numpy dtype) of the `Table.fields`.
    data_dir: tfds data root (default `DEFAULT_DATA_DIR`).
    manual_dir: the manual directory (part of the config name).
    image_size: stored image height and width.
    options: the dataset options that shape the prepared files.
    center_crop: crop images to their central square before resizing.
    description: tfds description of the dataset.

  Returns:
    (arrays, metadata): `image`, `index` and each field, sorted by `index`;
    and the `Table.metadata` saved at preparation.
  """
  choose(name, "split", split, SPLITS)
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  options = dict(options, center_crop=center_crop)
  cls = _builder_class(name, tuple((k, tuple(s), np.dtype(d).str)
                                   for k, (s, d) in sorted(fields.items())))
  config = cls.config_cls(
      name=config_name(name.removeprefix("baq_"), image_size, manual_dir,
                       options),
      description=description or name, image_size=image_size,
      center_crop=center_crop, options_json=json.dumps(options, sort_keys=True))
  builder = cls(config=config, data_dir=data_dir, table_fn=table_fn)
  builder.download_and_prepare()  # array_records.prepare: no-op once prepared
  if split in builder.info.splits:
    data = datasets.read_all(array_records.SplitRecords.of(builder, split))
  else:  # no files for an empty split (e.g. a split column without 'val')
    data = tf_example.decode([], tf_example.specs(builder.info.features))
  order = np.argsort(data["index"], kind="stable")
  return {k: v.take(order, axis=0) for k, v in data.items()}, dict(builder.info.metadata)


def to_split(data: dict, meta: dict, name: str) -> Split:
  """The `Split` of `load_table` output with `label` and `group` fields."""
  return Split(
      images=data["image"], labels=data["label"].astype(np.int32),
      groups=data["group"].astype(np.int32),
      num_classes=len(meta["class_names"]),
      num_groups=len(meta["group_names"]),
      class_names=tuple(meta["class_names"]),
      group_names=tuple(meta["group_names"]), name=name)


LABEL_GROUP_FIELDS = {"label": ((), np.int64), "group": ((), np.int64)}


_LOADER_DOC = """Loads a split of {title}, preparing it once from `manual_dir`.

  Args:
    split: 'train', 'validation' or 'test'.
    data_dir: tfds data root (default ~/tensorflow_datasets).
    manual_dir: folder with the dataset's files (see {module}).
    image_size: images are resized to image_size x image_size at preparation.
    center_crop: crop the central square before resizing.
    **options: the dataset's options (see {module}).

  Returns:
    The `Split` named '{name}/<split>', in table order.
  """


def _no_options(**options) -> dict:
  if options:
    raise TypeError(f"unexpected option(s) {', '.join(sorted(options))}.")
  return {}


def register_manual(name: str, table_fn: Callable[..., Table], *, title: str,
                    files: dict | Callable[[dict], dict], description: str,
                    make_options: Callable[..., dict] = _no_options,
                    fields: dict = LABEL_GROUP_FIELDS,
                    make_split: Callable[..., Split] = to_split,
                    read_options: Sequence[str] = (),
                    center_crop: bool = False) -> Callable[..., Split]:
  """Registers in `DATASETS` the loader of a dataset read from manual files.

  A dataset module writes `table_fn` (its files in, a `Table` out) and one
  call of this; the loader does the rest: it validates the options, checks
  that a manual directory was named, prepares the files once through
  `load_table` and returns the split. For example (folder.py):

      load_image_folder_csv = register_manual(
          "image_folder_csv", table, title=TITLE, files=_files,
          make_options=make_options, description="Images and a CSV ...")

  Args:
    name: the dataset's registered name; its tfds builder is 'baq_<name>'.
    table_fn: (manual_dir, **options) -> `Table`, called only to prepare.
    title: the dataset's name in messages, e.g. 'ISIC 2019'.
    files: the manual directory's entries (see `files.require`), or a
      function of the validated options that returns them.
    description: tfds description of the dataset.
    make_options: (**options) -> dict, validating the loader's keyword
      options (default: it takes none).
    fields: field name -> (shape, dtype) of the `Table.fields`.
    make_split: (arrays, metadata, split name, **read options) -> `Split`;
      the default reads the `label` and `group` fields.
    read_options: options applied when a split is read, not when files are
      prepared: they go to `make_split`, not to `table_fn`, and changing
      them reuses the prepared files.
    center_crop: the loader's default for `center_crop`.

  Returns:
    The loader, `(split, data_dir=None, manual_dir=None, image_size=64,
    center_crop=center_crop, **options) -> Split`, already registered.
  """

  def load(split: str, data_dir: str | None = None,
           manual_dir: str | None = None, image_size: int = 64,
           center_crop: bool = center_crop, **options) -> Split:
    options = make_options(**options)
    read = {k: options.pop(k) for k in read_options}
    require(title, manual_dir, files(options) if callable(files) else files,
            check_files=False)
    data, meta = load_table(
        f"baq_{name}", split, lambda: table_fn(manual_dir, **options), fields,
        data_dir, manual_dir, image_size, options,
        center_crop=bool(center_crop), description=description)
    return make_split(data, meta, f"{name}/{split}", **read)

  load.__name__ = load.__qualname__ = f"load_{name}"
  load.__module__ = table_fn.__module__
  load.__doc__ = _LOADER_DOC.format(title=title, name=name,
                                    module=table_fn.__module__)
  return datasets.DATASETS.register(name)(load)


@functools.lru_cache(maxsize=None)
def _builder_class(name: str, fields: tuple):
  """Makes (once per name) the tfds builder class for a manual dataset."""
  import dataclasses
  from etils import epath
  import tensorflow_datasets as tfds

  @dataclasses.dataclass(eq=False)
  class ManualConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    center_crop: bool = False
    options_json: str = "{}"

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images from a manual directory, resized, with per-example fields."""
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [ManualConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "See the module docstring of the baq.data loader registered as "
        f"{name.removeprefix('baq_')!r}.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
      return epath.Path(__file__)  # Needs no importlib_resources.

    def __init__(self, *, table_fn=None, file_format="array_record", **kw):
      self._table_fn = table_fn
      super().__init__(file_format=file_format, **kw)

    def _info(self):
      size = self.builder_config.image_size
      tensor = tfds.features.Tensor
      features = {k: tensor(shape=s, dtype=np.dtype(d)) for k, s, d in fields}
      features.update(
          image=tensor(shape=(size, size, 3), dtype=np.uint8,
                       encoding=tfds.features.Encoding.BYTES),
          index=tensor(shape=(), dtype=np.int64))
      return tfds.core.DatasetInfo(
          builder=self, description=self.builder_config.description,
          features=tfds.features.FeaturesDict(features),
          metadata=tfds.core.MetadataDict(), disable_shuffling=True)

    def download_and_prepare(self, **kwargs) -> None:
      """Writes the splits once, in table order (`array_records.prepare`)."""
      del kwargs  # tfds's options: nothing is downloaded, and no shuffler runs
      array_records.prepare(self, self._split_generators(None))

    def _split_generators(self, dl_manager):
      del dl_manager  # The table function reads the manual directory.
      table = self._table_fn()
      self.info.metadata.update(
          table.metadata, options=json.loads(self.builder_config.options_json))
      rows = [np.flatnonzero(table.splits == k) for k in range(3)]
      return {s: self._generate_examples(table, r)
              for s, r in zip(SPLITS, rows) if len(r)}

    def _generate_examples(self, table: Table, rows: np.ndarray):
      config = self.builder_config
      yield from _examples(table, rows, [k for k, _, _ in fields],
                           config.image_size, config.center_crop)

  Builder.name, Builder.config_cls = name, ManualConfig
  return Builder


def _examples(table: Table, rows: np.ndarray, fields: list, image_size: int,
              center_crop: bool):
  """Yields (key, example) for the table `rows`, decoding their images."""
  decode = functools.partial(load_image, size=image_size,
                             center_crop=center_crop)
  # PIL releases the GIL while decoding, so threads overlap the work.
  workers = min(4, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, len(rows), 1024):  # Bounded memory.
      chunk = rows[start:start + 1024]
      images = pool.map(decode, [table.paths[i] for i in chunk])
      for i, image in zip(chunk, images):
        example = {k: table.fields[k][i] for k in fields}
        yield int(i), dict(example, image=image, index=int(i))
