"""A prepared split's array_record files: written in generation order, read with grain.

baq's tfds builders (`baq.data.synthetic.builder`, `baq.data.manual.builder`)
keep tfds for what it owns in public (the features, `DatasetInfo`, the
directory layout, `builder.as_data_source()`) but write their splits
themselves. tfds's own writer sends every example through its shuffler, which
beyond 1 GB spills to temporary buckets through `tf.io.gfile`, i.e. needs
TensorFlow; baq's builders keep generation order anyway
(`disable_shuffling=True`), so nothing needs sorting.

Writing (`prepare`): each example is serialized with the public
`builder.info.features.serialize_example` (the bytes tfds's writer stores)
and appended to the split's current shard with array_record's public
`ArrayRecordWriter` ('group_size:1', as tfds writes, for random access); a
shard is closed once it holds `shard_bytes`, so memory stays at one example
whatever the split's size. The shards get tfds's file names, and the split
infos and metadata are written with `DatasetInfo.set_splits` /
`write_to_directory` into a temporary directory renamed into place at the
end: a prepared directory is complete or absent, and tfds reads it as its own.

Reading (`SplitRecords`): grain's public `ArrayRecordDataSource` over the
split's `info.splits[split].filepaths`, decoded by `baq.data.tf_example`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from baq.data import tf_example

SHARD_BYTES = 512 << 20  # a shard is closed past this many serialized bytes
WRITER_OPTIONS = "group_size:1"  # one record per chunk, as tfds writes


def write_split(template, examples: Iterable[tuple[Any, dict]], serialize,
                shard_bytes: int = SHARD_BYTES) -> tuple[list[int], int]:
  """Writes one split's examples, in the order given, as array_record shards.

  Args:
    template: the split's `tfds.core.ShardedFileTemplate` (names the shards).
    examples: (key, example) pairs; keys are ignored (order is generation
      order), examples are what `serialize` takes.
    serialize: example -> bytes (`builder.info.features.serialize_example`).
    shard_bytes: a shard is closed once it holds this many bytes.

  Returns:
    (examples in each shard, total serialized bytes); ([], 0) and no file
    for a split without examples.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  lengths, sizes, paths, writer = [], [], [], None
  for _, example in examples:
    if writer is None:
      paths.append(os.path.join(os.fspath(template.data_dir),
                                f"{template.split}-{len(paths):05d}.part"))
      writer = array_record_module.ArrayRecordWriter(paths[-1], WRITER_OPTIONS)
      lengths.append(0)
      sizes.append(0)
    record = serialize(example)
    writer.write(record)
    lengths[-1] += 1
    sizes[-1] += len(record)
    if sizes[-1] >= shard_bytes:
      writer.close()
      writer = None
  if writer is not None:
    writer.close()
  for i, path in enumerate(paths):  # the shard count is known only now
    os.replace(path, template.sharded_filepath(shard_index=i, num_shards=len(paths)))
  return lengths, sum(sizes)


def prepare(builder, splits: Mapping[str, Iterable[tuple[Any, dict]]],
            shard_bytes: int = SHARD_BYTES) -> None:
  """Writes a tfds builder's splits and `DatasetInfo`, unless already prepared.

  Args:
    builder: a tfds `DatasetBuilder` with flat `Tensor` features and
      `file_format='array_record'`; its `info` is updated to the written
      splits.
    splits: split name -> (key, example) pairs, in the order to store.
      Splits without examples are not written (as tfds).
    shard_bytes: see `write_split`.
  """
  from etils import epath  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  final = os.fspath(builder.data_dir)
  if builder.is_prepared():
    return
  print(f"[data] preparing {builder.name} ({builder.builder_config.name}) in {final} "
        "(first use)", flush=True)
  tmp = f"{final}.incomplete-{uuid.uuid4().hex}"
  os.makedirs(tmp)
  try:
    infos = []
    for name, examples in splits.items():
      template = tfds.core.ShardedFileTemplate(
          data_dir=epath.Path(tmp), dataset_name=builder.name, split=name,
          filetype_suffix=builder.info.file_format.file_suffix)
      lengths, size = write_split(template, examples,
                                  builder.info.features.serialize_example, shard_bytes)
      if lengths:
        infos.append(tfds.core.SplitInfo(name=name, shard_lengths=lengths,
                                         num_bytes=size, filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    builder.info.write_to_directory(tmp)
    if os.path.exists(final):  # another process prepared it meanwhile
      shutil.rmtree(tmp)
    else:
      os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  builder.info.read_from_directory(final)  # file paths under `final`, not `tmp`


class SplitRecords:
  """A prepared split's examples, read by position.

  grain's `ArrayRecordDataSource` over the split's files, and the specs
  that decode them (`tf_example.specs`). Pickles (paths and specs; grain's
  source reopens its files), so worker processes can read.

  Args:
    paths: the split's array_record files, in shard order.
    specs: `tf_example.specs(builder.info.features)`.
  """

  def __init__(self, paths: Sequence[str], specs: Mapping[str, tf_example.Spec]):
    import grain  # pylint: disable=import-outside-toplevel
    self.paths, self.specs = [os.fspath(p) for p in paths], dict(specs)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  @classmethod
  def of(cls, builder, split: str) -> "SplitRecords":
    """The records of `split` of a prepared tfds builder."""
    return cls(builder.info.splits[split].filepaths,
               tf_example.specs(builder.info.features))

  def __len__(self) -> int:
    return len(self._source)

  def raw(self, positions: Sequence[int]) -> list[bytes]:
    """The serialized examples at `positions` (ints), in that order."""
    positions = [int(p) for p in positions]
    return list(self._source.__getitems__(positions)) if positions else []

  def read(self, positions: Sequence[int],
           names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Features `names` (default all) of the examples at `positions`, stacked."""
    return tf_example.decode(self.raw(positions), self.specs, names)
