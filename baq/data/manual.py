"""Shared pieces of the real-dataset loaders: manual files in, tfds files out.

Real datasets cannot be downloaded at run time: the user places the official
files in a *manual directory* and names it in the config
(`dataset.kwargs.manual_dir`). Each dataset module turns that directory into a
`Table` (image paths, per-example fields, split assignment, names), and this
module does the rest:

  * `require` checks the manual directory and names what is missing, where it
    should go and where it comes from; `choose` rejects unknown option values
    listing the valid ones; `find_missing_images` applies the missing-image
    policy.
  * `load_image` decodes with PIL and resizes to `size` x `size` RGB uint8.
  * `assign_splits` gives train/validation/test from a seed so that examples
    sharing a unit (a lesion, a patient) never sit in two splits, stratified
    by group (and by label within a group).
  * `load_table` writes a `Table` once through a tensorflow-datasets builder
    (plain `Tensor` features, `array_record` files, no TensorFlow) and reads a
    split back into memory.

tensorflow-datasets is imported only inside `load_table`, so that
`import baq.data` stays light; the builder class is therefore made there.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import hashlib
import json
import os
from typing import Any, NamedTuple, Sequence

import numpy as np

from baq.data import datasets
from baq.data.datasets import Split

SPLITS = ("train", "validation", "test")
DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


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


def require(title: str, manual_dir: str | None, entries: dict,
            check_files: bool = True) -> str:
  """Checks that `manual_dir` holds every file or folder in `entries`.

  Args:
    title: dataset name used in messages, e.g. 'ISIC 2019'.
    manual_dir: the directory the config names.
    entries: relative path -> where to get it (a sentence).
    check_files: False checks only that a directory was named (prepared
      files are read without it).

  Returns:
    The absolute, user-expanded manual directory.

  Raises:
    ValueError: no `manual_dir` was given.
    FileNotFoundError: the directory or some entries are missing; the message
      names each missing entry, where it should go and where it comes from.
  """
  if not manual_dir:
    raise ValueError(
        f"{title}: pass manual_dir (dataset.kwargs.manual_dir), the folder "
        f"holding {', '.join(entries)}.")
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  missing = [name for name in entries if check_files
             and not os.path.exists(os.path.join(manual_dir, name))]
  if missing:
    lines = [f"  {name}: {entries[name]}" for name in missing]
    raise FileNotFoundError(
        f"{title}: missing {', '.join(missing)} in {manual_dir}. Place them "
        "there (nothing is downloaded at run time):\n" + "\n".join(lines))
  return manual_dir


def choose(title: str, option: str, value: Any, valid: Sequence) -> Any:
  """Returns `value` if it is in `valid`, else raises listing the valid ones."""
  if value not in valid:
    raise ValueError(f"{title}: unknown {option} {value!r}; valid values: "
                     f"{', '.join(repr(v) for v in valid)}.")
  return value


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
  """Validates train/validation/test fractions: three, positive, sum 1."""
  fractions = tuple(float(f) for f in fractions)
  if (len(fractions) != 3 or min(fractions) <= 0
      or abs(sum(fractions) - 1) > 1e-6):
    raise ValueError(f"fractions must be three positive numbers (train, "
                     f"validation, test) summing to 1, got {fractions}.")
  return fractions


def read_csv(title: str, path: str, columns: Sequence[str]) -> list[dict]:
  """Reads a CSV into dicts, checking that it has `columns`."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    absent = [c for c in columns if c not in (reader.fieldnames or ())]
    if absent:
      raise ValueError(f"{title}: {path} lacks column(s) {', '.join(absent)}; "
                       f"it has {', '.join(reader.fieldnames or ())}.")
    return list(reader)


def find_missing_images(title: str, paths: Sequence[str], policy: str,
                        source: str) -> np.ndarray:
  """Applies the missing-image policy ('error' or 'skip').

  Args:
    title: dataset name for messages.
    paths: the image files the table lists.
    policy: 'error' raises if any is missing; 'skip' drops those rows.
    source: where the rows came from (a CSV path), for the message.

  Returns:
    bool [n]: which rows to keep.
  """
  choose(title, "missing_images", policy, ("error", "skip"))
  keep = np.array([os.path.isfile(p) for p in paths], bool)
  if policy == "error" and not keep.all():
    gone = [os.path.basename(p) for p, k in zip(paths, keep) if not k]
    raise FileNotFoundError(
        f"{title}: {len(gone)} of {len(paths)} images listed in {source} are "
        f"missing from {os.path.dirname(paths[0])} (e.g. "
        f"{', '.join(gone[:5])}). Add them, or pass missing_images='skip' to "
        "leave those rows out.")
  return keep


def load_image(path: str, size: int, center_crop: bool = False) -> np.ndarray:
  """Decodes an image with PIL into uint8 [size, size, 3] RGB.

  Args:
    path: image file (any format PIL reads).
    size: output height and width.
    center_crop: crop the central square first (keeps the aspect ratio);
      otherwise the whole image is resized, squashing non-square ones.

  Returns:
    The resized image.
  """
  from PIL import Image
  with Image.open(path) as img:
    # JPEGs decode at a reduced DCT scale when that still covers `size`:
    # several times faster on full-resolution photographs.
    img.draft("RGB", (size, size))
    img = img.convert("RGB")
    if center_crop and img.width != img.height:
      side = min(img.size)
      left, top = (img.width - side) // 2, (img.height - side) // 2
      img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
      img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, np.uint8)


def assign_splits(units: Sequence, groups: np.ndarray, labels: np.ndarray,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  seed: int = 0) -> np.ndarray:
  """Seeded train/validation/test assignment that keeps units together.

  Every example of a unit (e.g. all images of one lesion) lands in the same
  split. Units are taken group by group; inside a group they are ordered by
  label, shuffled within a label, and dealt one by one to the split furthest
  below its share (j * fraction - count), so each group is split in the
  given fractions to within about one unit, and each label within a group to
  within about two. A group with at least three units gets at least one in
  every split.

  Args:
    units: [n] hashable unit of each example.
    groups: int [n] group of each example (a unit takes its first example's).
    labels: int [n] label of each example (likewise).
    fractions: (train, validation, test) shares of each group's units.
    seed: numpy seed of the shuffle.

  Returns:
    int8 [n] split of each example, an index into `SPLITS`.
  """
  fractions = np.asarray(check_fractions(fractions))
  unit_ids, first = {}, []
  example_unit = np.empty(len(units), np.int64)
  for i, unit in enumerate(units):
    if unit not in unit_ids:
      unit_ids[unit] = len(first)
      first.append(i)
    example_unit[i] = unit_ids[unit]
  first = np.asarray(first, np.int64)
  unit_group, unit_label = np.asarray(groups)[first], np.asarray(labels)[first]
  rng = np.random.default_rng(seed)
  tiebreak = rng.permutation(len(first))
  unit_split = np.empty(len(first), np.int8)
  for group in np.unique(unit_group):
    members = np.flatnonzero(unit_group == group)
    members = members[np.lexsort((tiebreak[members], unit_label[members]))]
    counts = np.zeros(3, np.int64)
    for j, unit in enumerate(members, start=1):
      k = int(np.argmax(j * fractions - counts))
      unit_split[unit], counts[k] = k, counts[k] + 1
    for k in np.flatnonzero(counts == 0) if len(members) >= 3 else ():
      donor = int(np.argmax(counts))  # Move the donor's last unit over.
      unit = members[unit_split[members] == donor][-1]
      unit_split[unit], counts[k], counts[donor] = k, 1, counts[donor] - 1
  return unit_split[example_unit]


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
  import tensorflow_datasets as tfds
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
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  if split in builder.info.splits:
    data = datasets.read_all(builder.as_data_source(split=split))
  else:  # tfds writes no empty split (e.g. a split column without 'val').
    features = builder.info.features
    data = {k: np.zeros((0, *features[k].shape), features[k].np_dtype)
            for k in features.keys()}
  order = np.argsort(data["index"], kind="stable")
  return {k: v[order] for k, v in data.items()}, dict(builder.info.metadata)


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


def load_labelled(name: str, title: str, split: str, table_fn, files: dict,
                  data_dir: str | None, manual_dir: str | None, image_size: int,
                  options: dict, center_crop: bool, description: str) -> Split:
  """`require`, `load_table` and `to_split` for a dataset of labels and groups.

  Args:
    name: the registered dataset name ('isic2019'); the builder is 'baq_<name>'.
    title: the dataset's name in messages.
    split: 'train', 'validation' or 'test'.
    table_fn: () -> `Table` with `label` and `group` fields.
    files: the manual directory's required entries (see `require`).
    data_dir: tfds data root.
    manual_dir: the manual directory.
    image_size: stored image height and width.
    options: the validated dataset options.
    center_crop: crop images to their central square before resizing.
    description: tfds description of the dataset.

  Returns:
    The `Split` named '<name>/<split>'.
  """
  require(title, manual_dir, files, check_files=False)
  data, meta = load_table(f"baq_{name}", split, table_fn, LABEL_GROUP_FIELDS, data_dir,
                          manual_dir, image_size, options, center_crop=bool(center_crop),
                          description=description)
  return to_split(data, meta, f"{name}/{split}")


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
      decode = functools.partial(load_image, size=config.image_size,
                                 center_crop=config.center_crop)
      # PIL releases the GIL while decoding, so threads overlap the work.
      workers = min(4, os.cpu_count() or 1)
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(rows), 1024):  # Bounded memory.
          chunk = rows[start:start + 1024]
          images = pool.map(decode, [table.paths[i] for i in chunk])
          for i, image in zip(chunk, images):
            example = {k: table.fields[k][i] for k, _, _ in fields}
            yield int(i), dict(example, image=image, index=int(i))

  Builder.name, Builder.config_cls = name, ManualConfig
  return Builder
