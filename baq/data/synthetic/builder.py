"""A tensorflow-datasets builder for the SYNTHETIC dermatology-like set.

The images are rendered locally by `baq.data.synthetic.generate` from a seed; nothing
is downloaded. The builder works without TensorFlow: its features are plain
`tfds.features.Tensor`s, it writes `array_record` files, and it is read back
with `builder.as_data_source()` (random access, numpy out). These choices make
that possible in tfds 4.9:

  * `_info` builds `tfds.core.DatasetInfo` directly: the usual
    `dataset_info_from_configs` looks for metadata files beside the builder's
    source, which a builder living in a library package does not have.
  * `file_format='array_record'` is the constructor default: the tfrecord
    reader needs `tf.data`.
  * `code_path` is this file, so that tfds need not resolve the package.
  * `download_and_prepare` writes the splits with `baq.data.array_records`
    (array_record's writer, in generation order), not through tfds's
    shuffler, which needs TensorFlow for a split over 1 GB.

Each split is a pure function of (config, split): the same seed gives
identical arrays, and `split_records` recreates the lesion records behind a
prepared split without reading it, for counterfactual rendering.

Usage:

  builder = make_builder(data_dir='/tmp/tfds', image_size=16, num_train=64)
  builder.download_and_prepare()
  train = builder.as_data_source(split='train')
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from baq.data import array_records
from baq.data.synthetic import generate as synthetic

DEFAULT_DATA_DIR = os.path.join("~", "tensorflow_datasets")
_DESCRIPTION = """\
SYNTHETIC dermatology-like images (not real patient data), rendered by
baq.data.synthetic.generate. Skin tone defines six groups, Fitzpatrick types I-VI
(group 0..5), drawn in Fitzpatrick17k's proportions, with skin colours drawn
from each type's ITA band. Labels: 0 benign, 1 malignant, 2 non-neoplastic.
Lesion-to-skin contrast falls as skin darkens, so the darkest types are
hardest. `index` is the example's position in its split, and `skin_lab` the
CIELAB skin colour it was rendered on.
"""


@dataclasses.dataclass(eq=False)
class SyntheticDermConfig(tfds.core.BuilderConfig):
  """Image size, split sizes and seed of one version of the synthetic set.

  Use `make_config`, which names the config after its fields, so that two
  different configs never share a directory under `data_dir`.
  """
  image_size: int = 32
  num_train: int = 20_000
  num_validation: int = 2_000
  num_test: int = 10_000
  seed: int = 0

  def split_size(self, split: str) -> int:
    """Number of examples of `split` ('train', 'validation' or 'test')."""
    return {"train": self.num_train, "validation": self.num_validation,
            "test": self.num_test}[split]


def make_config(image_size: int = 32, num_train: int = 20_000,
                num_validation: int = 2_000, num_test: int = 10_000,
                seed: int = 0) -> SyntheticDermConfig:
  """Returns the config for these settings, named after them.

  Args:
    image_size: height and width of the images in pixels.
    num_train: examples in the 'train' split.
    num_validation: examples in the 'validation' split.
    num_test: examples in the 'test' split.
    seed: base seed; split k is drawn from `default_rng([seed, k])`.

  Returns:
    A `SyntheticDermConfig` named e.g. 's32_n20000-2000-10000_seed0'.
  """
  name = (f"s{image_size}_n{num_train}-{num_validation}-{num_test}"
          f"_seed{seed}")
  return SyntheticDermConfig(
      name=name, image_size=image_size, num_train=num_train,
      num_validation=num_validation, num_test=num_test, seed=seed,
      description=f"SYNTHETIC {image_size}x{image_size} images, seed {seed}.")


def split_seed(config: SyntheticDermConfig, split: str) -> list[int]:
  """The numpy seed of one split: `[config.seed, index of split]`."""
  return [config.seed, synthetic.SPLITS.index(split)]


def split_records(config: SyntheticDermConfig, split: str):
  """Recreates (skin types, lesion records, skin colours) behind a split.

  Rendering them with `synthetic.render(lesions, skin_lab, image_size)` gives
  exactly the images the builder writes, so no files are needed.

  Args:
    config: the dataset config.
    split: 'train', 'validation' or 'test'.

  Returns:
    (groups int32 [n], `synthetic.LesionParams`, skin_lab float32 [n, 3]).
  """
  return synthetic.sample_records(config.split_size(split),
                                  split_seed(config, split))


class BaqSyntheticDerm(tfds.core.GeneratorBasedBuilder):
  """SYNTHETIC dermatology-like images grouped by Fitzpatrick skin type."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [make_config()]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds would derive this from the top-level package's resources, which
    # needs the optional importlib_resources; this file is the answer anyway.
    return epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    tensor = tfds.features.Tensor
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tensor(shape=(size, size, 3), dtype=np.uint8,
                            encoding=tfds.features.Encoding.BYTES),
            "label": tensor(shape=(), dtype=np.int64),
            "group": tensor(shape=(), dtype=np.int64),
            "index": tensor(shape=(), dtype=np.int64),
            "skin_lab": tensor(shape=(3,), dtype=np.float32),
        }),
        supervised_keys=("image", "label"),
        # Keep generation order, so that record i of a split is example i.
        disable_shuffling=True,
    )

  def download_and_prepare(self, **kwargs) -> None:
    """Writes every split once (`array_records.prepare`); a no-op once prepared.

    Args:
      **kwargs: tfds's `download_and_prepare` options, ignored: nothing is
        downloaded and the files are always array_record.
    """
    del kwargs
    array_records.prepare(self, self._split_generators(None))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: every split is rendered locally.
    return {split: self._generate_examples(split)
            for split in synthetic.SPLITS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    groups, lesions, skin = split_records(config, split)
    # Render in blocks: all of train at once would hold ~1 GB of float planes.
    block = 4096
    for start in range(0, len(groups), block):
      stop = min(start + block, len(groups))
      images = synthetic.render(lesions.take(slice(start, stop)),
                                skin[start:stop], config.image_size)
      for i in range(start, stop):
        yield i, {"image": images[i - start], "label": lesions.label[i],
                  "group": groups[i], "index": i, "skin_lab": skin[i]}


def make_builder(data_dir: str | None = None, **config_kwargs
                 ) -> BaqSyntheticDerm:
  """Returns the builder of the config `make_config(**config_kwargs)`.

  Args:
    data_dir: root of the tfds data; defaults to `DEFAULT_DATA_DIR`. The files
      land in `data_dir/baq_synthetic_derm/<config name>/1.0.0`.
    **config_kwargs: `make_config` arguments (image_size, num_train, ...).

  Returns:
    An unprepared-or-prepared builder; call `download_and_prepare()` (a no-op
    once prepared) before `as_data_source()`.
  """
  data_dir = os.path.expanduser(data_dir or DEFAULT_DATA_DIR)
  config = make_config(**config_kwargs)
  # tfds refuses a config object that shares a name with a listed config, so
  # a listed one is asked for by name.
  if config.name in BaqSyntheticDerm.builder_configs:
    config = config.name
  return BaqSyntheticDerm(config=config, data_dir=data_dir)
