"""Tests of the CelebA loader, the generic image folder + CSV loader and
baq.data.manual.files: the official CelebA lists, CSV column mapping, split
columns, unit-keeping stratified splits, and unreadable or missing images
(named with their CSV line, or skipped). The fixtures are written to tmp_path
with the helpers of test_real_datasets.py (solid-colour images whose colour
encodes the row), and checked against the CSVs parsed independently of the
loaders.
"""

import os

import numpy as np
from PIL import Image
import pytest

from baq.data import DATASETS
from baq.data.manual import celeba, folder, files as manual_files
from test_real_datasets import _check_colours, _colour, _jpeg, _read_csv, _rows_of, _write_csv


# CelebA fixture: the official list formats, portrait 16x32 images whose
# central 16x16 square is one colour and the 8-row bands above and below blue.
@pytest.fixture(name="celeba_dir")
def _celeba_dir(tmp_path):
  rng = np.random.default_rng(1)
  files = [f"{i:06d}.jpg" for i in range(1, 16)]
  attrs = rng.choice([-1, 1], (15, 40))
  for i, name in enumerate(files):
    pixels = np.zeros((32, 16, 3), np.uint8)
    pixels[:] = (0, 0, 255)
    pixels[8:24] = _colour(i)
    os.makedirs(tmp_path / celeba.IMAGES, exist_ok=True)
    # 4:4:4 JPEG: the 8x8 blocks end where the bands do, so nothing bleeds.
    Image.fromarray(pixels).save(tmp_path / celeba.IMAGES / name, quality=95,
                                 subsampling=0)
  with open(tmp_path / "list_attr_celeba.txt", "w") as f:
    f.write("15\n" + " ".join(celeba.ATTRIBUTES) + " \n")
    for name, row in zip(files, attrs):
      f.write(name + " " + " ".join(f"{v:2d}" for v in row) + "\n")
  with open(tmp_path / "list_eval_partition.txt", "w") as f:
    f.writelines(f"{n} {i % 3}\n" for i, n in enumerate(files))
  return str(tmp_path), files, attrs


def test_celeba_official_partition_attributes_and_center_crop(celeba_dir,
                                                              tmp_path):
  manual_dir, files, attrs = celeba_dir
  data_dir = str(tmp_path / "tfds")
  blond = celeba.ATTRIBUTES.index("Blond_Hair")
  for k, split in enumerate(manual_files.SPLITS):
    rows = np.arange(k, 15, 3)  # Partition i % 3.
    data = celeba.load_celeba(split, data_dir=data_dir, manual_dir=manual_dir,
                              image_size=8)
    np.testing.assert_array_equal(data.labels, attrs[rows, blond] > 0)
    np.testing.assert_array_equal(
        data.groups, attrs[rows, celeba.ATTRIBUTES.index("Male")] > 0)
    assert data.class_names == ("not Blond_Hair", "Blond_Hair")
    # The central square only: no blue band survives the crop.
    _check_colours(data, rows, {i: i for i in rows})
  smiling = celeba.load_celeba("test", data_dir=data_dir,
                               manual_dir=manual_dir, image_size=8,
                               target_attribute="Smiling",
                               sensitive_attribute="Young")
  np.testing.assert_array_equal(
      smiling.labels, attrs[2::3, celeba.ATTRIBUTES.index("Smiling")] > 0)
  np.testing.assert_array_equal(
      smiling.groups, attrs[2::3, celeba.ATTRIBUTES.index("Young")] > 0)
  # Attributes are picked at load time: one prepared directory serves both.
  prepared = os.listdir(os.path.join(data_dir, "baq_celeba"))
  assert len([d for d in prepared if not d.startswith(".")]) == 1
  with pytest.raises(ValueError, match="unknown target_attribute 'Blonde'.*"
                                       "'5_o_Clock_Shadow'"):
    celeba.load_celeba("train", manual_dir=manual_dir,
                       target_attribute="Blonde")


def test_celeba_kaggle_csvs_and_missing_lists(celeba_dir):
  manual_dir, files, attrs = celeba_dir
  os.remove(os.path.join(manual_dir, "list_eval_partition.txt"))
  with pytest.raises(FileNotFoundError,
                     match="missing list_eval_partition.txt in"):
    celeba.table(manual_dir)
  _write_csv(os.path.join(manual_dir, "list_eval_partition.csv"),
             ["image_id", "partition"], [[n, 2] for n in files])
  assert np.all(celeba.table(manual_dir).splits == 2)  # .txt attributes.
  _write_csv(os.path.join(manual_dir, "list_attr_celeba.csv"),
             ["image_id"] + celeba.ATTRIBUTES[::-1],
             [[n] + list(a[::-1]) for n, a in zip(files, attrs)])
  os.remove(os.path.join(manual_dir, "list_attr_celeba.txt"))
  nested = os.path.join(manual_dir, celeba.IMAGES, celeba.IMAGES)
  aside = os.path.join(manual_dir, "aside")
  os.rename(os.path.join(manual_dir, celeba.IMAGES), aside)
  os.makedirs(os.path.dirname(nested))
  os.rename(aside, nested)  # Kaggle's img_align_celeba/img_align_celeba.
  table = celeba.table(manual_dir)
  assert table.paths[0] == os.path.join(nested, files[0])
  assert np.all(table.splits == 2)
  np.testing.assert_array_equal(table.fields["attributes"], attrs > 0)


# Generic image folder + CSV: ids, numeric group values, a split column.
@pytest.fixture(name="folder_dir")
def _folder_dir(tmp_path):
  rows = []
  for i in range(40):
    _jpeg(str(tmp_path / "pics" / f"p{i}.png"), i)
    group = ("10", "2", "", "2")[i % 4]
    rows.append([f"p{i}", ("mole", "cyst", "wart")[i % 3], group,
                 f"patient{i // 4}", ("train", "val", "test", "train")[i % 4]])
  _write_csv(tmp_path / "meta.csv",
             ["file", "dx", "site", "patient", "fold"], rows)
  return str(tmp_path)


def test_image_folder_csv_mapping_ids_and_split_column(folder_dir, tmp_path):
  kwargs = dict(manual_dir=folder_dir, csv_file="meta.csv", images_dir="pics",
                image_suffix=".png", image_column="file", label_column="dx",
                group_column="site", id_column="patient", image_size=4,
                data_dir=str(tmp_path / "tfds"))
  rows = _read_csv(os.path.join(folder_dir, "meta.csv"))
  total, patients = 0, []
  for split in manual_files.SPLITS:
    data = DATASETS.get("image_folder_csv")(split, **kwargs)
    assert data.class_names == ("cyst", "mole", "wart")
    assert data.group_names == ("2", "10")  # Numeric order, empties dropped.
    table = folder.table(**{k: v for k, v in kwargs.items()
                            if k not in ("image_size", "data_dir")})
    files = [table.metadata["images"][i] for i in _rows_of(table, split)]
    np.testing.assert_array_equal(
        data.labels, [data.class_names.index(rows[f]["dx"]) for f in files])
    np.testing.assert_array_equal(
        data.groups, [data.group_names.index(rows[f]["site"]) for f in files])
    _check_colours(data, files, {f: int(f[1:]) for f in rows})
    total += len(data)
    patients.append({rows[f]["patient"] for f in files})
  assert total == 30
  assert sum(map(len, patients)) == len(set.union(*patients)) == 10
  own = folder.table(folder_dir, csv_file="meta.csv", images_dir="pics",
                     image_suffix=".png", image_column="file",
                     label_column="dx", group_column="site",
                     split_column="fold", missing_group="own_group")
  assert own.metadata["group_names"] == ["2", "10", "unknown"]
  np.testing.assert_array_equal(own.fields["group"], [1, 0, 2, 0] * 10)
  np.testing.assert_array_equal(own.splits, [0, 1, 2, 0] * 10)
  # A split column without validation rows gives an empty split.
  _write_csv(os.path.join(folder_dir, "two.csv"), ["image", "label", "group",
                                                   "split"],
             [[f"p{i}.png", "x", "g", ("train", "test")[i % 2]]
              for i in range(6)])
  empty = folder.load_image_folder_csv(
      "validation", data_dir=str(tmp_path / "tfds"), manual_dir=folder_dir,
      csv_file="two.csv", images_dir="pics", split_column="split",
      image_size=4)
  assert empty.images.shape == (0, 4, 4, 3) and empty.class_names == ("x",)
  with pytest.raises(ValueError, match="lacks column.*dx"):
    folder.table(folder_dir, csv_file="meta.csv", images_dir="pics")


# An image folder with unreadable files: an empty .jpg on CSV line 4, one of
# garbage bytes on line 7 and a truncated one on line 9 (the header is line 1).
@pytest.fixture(name="bad_folder")
def _bad_folder(tmp_path):
  rows = []
  for i in range(10):
    _jpeg(str(tmp_path / "images" / f"im{i}.jpg"), i)
    rows.append([f"im{i}.jpg", "ab"[i % 2], ("g0", "g1")[i // 2 % 2], "train"])
  _write_csv(tmp_path / "labels.csv", ["image", "label", "group", "split"],
             rows)
  (tmp_path / "images" / "im2.jpg").write_bytes(b"")
  (tmp_path / "images" / "im5.jpg").write_bytes(b"\x00 not an image " * 9)
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
  Image.fromarray(noise).save(tmp_path / "images" / "im7.jpg", quality=95)
  whole = (tmp_path / "images" / "im7.jpg").read_bytes()
  (tmp_path / "images" / "im7.jpg").write_bytes(whole[:len(whole) // 2])
  return str(tmp_path)


def test_unreadable_images_are_named_with_their_csv_line(bad_folder,
                                                         tmp_path):
  images = os.path.join(bad_folder, "images")
  kwargs = dict(data_dir=str(tmp_path / "tfds"), manual_dir=bad_folder,
                split_column="split", image_size=4)
  with pytest.raises(ValueError) as error:
    folder.load_image_folder_csv("train", **kwargs)
  message = str(error.value)
  assert "3 of 10 images listed in" in message
  for line, i in ((4, 2), (7, 5), (9, 7)):
    assert f"line {line}: {os.path.join(images, f'im{i}.jpg')} (" in message
  assert "truncated" in message and "missing_images='skip'" in message
  with pytest.raises(ValueError, match=r"cannot read image .*im5\.jpg"):
    manual_files.load_image(os.path.join(images, "im5.jpg"), 4)


def test_skip_drops_unreadable_images_like_missing_ones(bad_folder,
                                                        tmp_path):
  os.remove(os.path.join(bad_folder, "images", "im8.jpg"))  # And a missing one.
  data = folder.load_image_folder_csv(
      "train", data_dir=str(tmp_path / "tfds"), manual_dir=bad_folder,
      split_column="split", image_size=4, missing_images="skip")
  kept = [0, 1, 3, 4, 6, 9]
  assert len(data) == len(kept)
  np.testing.assert_array_equal(data.labels, [i % 2 for i in kept])
  np.testing.assert_array_equal(data.groups, [i // 2 % 2 for i in kept])
  assert data.class_names == ("a", "b") and data.group_names == ("g0", "g1")
  _check_colours(data, kept, {i: i for i in kept})
  table = folder.table(bad_folder, missing_images="skip")
  assert table.metadata["images"] == [f"im{i}.jpg" for i in kept]


def test_assign_splits_keeps_units_together_and_stratifies():
  rng = np.random.default_rng(3)
  units = rng.integers(0, 400, 1000)
  groups = units % 5 == 0                       # 20% of units in group 1.
  labels = units % 3
  splits = manual_files.assign_splits(units, groups, labels, (0.6, 0.2, 0.2), 7)
  for u in np.unique(units):
    assert len(set(splits[units == u])) == 1
  for g in (0, 1):
    members = np.unique(units[groups == g])
    first = np.array([np.flatnonzero(units == u)[0] for u in members])
    counts = np.bincount(splits[first], minlength=3)
    np.testing.assert_allclose(counts, [.6 * len(members), .2 * len(members),
                                        .2 * len(members)], atol=1)
  tiny = manual_files.assign_splits(["a", "b", "c"], np.zeros(3, int),
                              np.zeros(3, int), (0.8, 0.1, 0.1), 0)
  assert sorted(tiny) == [0, 1, 2]  # Three units: one in each split.
