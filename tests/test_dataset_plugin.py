"""A new dataset is one new file: a plug-in module registers it, `load` reads it.

The test writes one Python module outside baq, in tmp_path, that registers a
manual-file dataset with `baq.data.manual.builder.register_manual`, imports it
by name as `config.imports` does, and loads it through `baq.data.load` with no
other edit. It also checks, in a fresh interpreter, that the built-in real
datasets are found by the registry's discovery of `baq.data.manual`, not by
imports in `baq.data`, and that none of this imports tensorflow-datasets.
"""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

import baq.data
from baq.data import DATASETS
from baq.data.manual import isic2019
from conftest import ROOT

MODULE = "baq_plugin_shapes"   # The plug-in module, as config.imports names it.
NAME = "shapes"                # The dataset it registers.
BUILT_IN = ("celeba", "fitzpatrick17k", "image_folder_csv", "isic2019")

# The whole plug-in: a table function and one call of the shared helper.
PLUGIN_SOURCE = '''"""Shapes: PNGs in images/, labels.csv of image, label, group, split."""

import os

import numpy as np

from baq.data.manual import builder, files

TITLE = "Shapes"
FILES = {"labels.csv": "one row per image", "images": "the PNG files"}


def table(manual_dir):
  """Reads labels.csv into a `builder.Table`."""
  manual_dir = files.require(TITLE, manual_dir, FILES)
  csv_path = os.path.join(manual_dir, "labels.csv")
  rows = files.read_csv(TITLE, csv_path, ("image", "label", "group", "split"))
  paths = [os.path.join(manual_dir, "images", r["image"]) for r in rows]
  files.find_missing_images(TITLE, paths, "error", csv_path)
  classes = sorted({r["label"] for r in rows})
  groups = sorted({r["group"] for r in rows})
  return builder.Table(
      paths=paths,
      splits=np.array([files.SPLITS.index(r["split"]) for r in rows], np.int8),
      fields={"label": np.array([classes.index(r["label"]) for r in rows]),
              "group": np.array([groups.index(r["group"]) for r in rows])},
      metadata={"class_names": classes, "group_names": groups})


load_shapes = builder.register_manual(
    "shapes", table, title=TITLE, files=FILES,
    description="Solid-colour shapes from a manual directory.")
'''

LABELS = ("circle", "square", "circle", "circle", "square", "square", "circle",
          "square", "circle")
GROUPS = ("light", "dark", "dark", "light", "light", "dark", "dark", "light",
          "light")
SPLITS = ("train", "train", "test", "train", "validation", "train", "train",
          "test", "train")


def _colour(i):
  return np.array([20 * i + 10, 250 - 25 * i, (60 * i) % 256], np.uint8)


@pytest.fixture(name="manual_dir")
def _manual_dir(tmp_path):
  """labels.csv and nine solid-colour 6x6 PNGs whose colour encodes the row."""
  images = tmp_path / "shapes" / "images"
  images.mkdir(parents=True)
  lines = ["image,label,group,split"]
  for i, row in enumerate(zip(LABELS, GROUPS, SPLITS)):
    Image.fromarray(np.broadcast_to(_colour(i), (6, 6, 3))).save(
        images / f"s{i}.png")
    lines.append(",".join((f"s{i}.png",) + row))
  (tmp_path / "shapes" / "labels.csv").write_text("\n".join(lines) + "\n")
  return str(tmp_path / "shapes")


@pytest.fixture(name="plugin")
def _plugin(tmp_path, monkeypatch):
  """Writes the plug-in module, imports it by name; unregisters it after."""
  code = tmp_path / "plugins"
  code.mkdir()
  (code / f"{MODULE}.py").write_text(PLUGIN_SOURCE)
  monkeypatch.syspath_prepend(str(code))
  assert NAME not in DATASETS
  module = importlib.import_module(MODULE)  # As config.imports does.
  yield module
  DATASETS.unregister(NAME)
  sys.modules.pop(MODULE, None)
  assert NAME not in DATASETS


def test_a_plugin_file_registers_a_dataset_that_load_reads(plugin, manual_dir,
                                                           tmp_path):
  assert NAME in DATASETS.names()
  assert DATASETS.get(NAME) is plugin.load_shapes
  train = baq.data.load(NAME, "train", data_dir=str(tmp_path / "tfds"),
                        manual_dir=manual_dir, image_size=4)
  rows = [i for i, s in enumerate(SPLITS) if s == "train"]
  assert isinstance(train, baq.data.Split) and train.name == "shapes/train"
  assert len(train) == len(rows) == 6
  np.testing.assert_array_equal(
      train.images,
      np.stack([np.broadcast_to(_colour(i), (4, 4, 3)) for i in rows]))
  assert train.class_names == ("circle", "square")
  assert train.group_names == ("dark", "light")
  assert (train.num_classes, train.num_groups) == (2, 2)
  np.testing.assert_array_equal(
      train.labels, [train.class_names.index(LABELS[i]) for i in rows])
  np.testing.assert_array_equal(
      train.groups, [train.group_names.index(GROUPS[i]) for i in rows])
  assert train.labels.dtype == np.int32 and train.groups.dtype == np.int32
  test = baq.data.load(NAME, "test", data_dir=str(tmp_path / "tfds"),
                       manual_dir=manual_dir, image_size=4)
  np.testing.assert_array_equal(test.labels, [0, 1])   # Rows 2 and 7.
  np.testing.assert_array_equal(test.groups, [0, 1])
  # The helper's loader keeps the shared checks and messages.
  with pytest.raises(ValueError, match="Shapes: pass manual_dir"):
    baq.data.load(NAME, "train")
  with pytest.raises(TypeError, match="unexpected option.*colour"):
    baq.data.load(NAME, "train", manual_dir=manual_dir, colour="red")


def test_built_in_manual_datasets_are_found_by_discovery():
  assert set(BUILT_IN) | {"synthetic_derm"} <= set(DATASETS.names())
  assert DATASETS.get("isic2019") is isic2019.load_isic2019
  # In a fresh interpreter: importing baq.data imports no loader module; the
  # first lookup imports them all, and tensorflow-datasets stays unloaded.
  script = (
      "import json, sys\n"
      "import baq.data\n"
      "def manual(): return sorted(m for m in sys.modules\n"
      "                            if m.startswith('baq.data.manual.'))\n"
      "before = manual()\n"
      "names = baq.data.DATASETS.names()\n"
      "print(json.dumps([before, names, manual(),\n"
      "                  'tensorflow_datasets' in sys.modules]))\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
  before, names, after, tfds_loaded = json.loads(out.stdout.splitlines()[-1])
  assert before == []
  assert names == sorted(BUILT_IN + ("synthetic_derm",))
  assert {f"baq.data.manual.{m}" for m in ("celeba", "fitzpatrick17k",
                                           "folder", "isic2019")} <= set(after)
  assert tfds_loaded is False
