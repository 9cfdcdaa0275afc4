"""Tests of the real-dataset loaders: ISIC 2019, Fitzpatrick17k, CelebA, CSV.

Tiny fixtures in the official file formats are written to tmp_path, with
solid-colour JPEGs whose colour encodes the row, so a test can tell that each
stored image belongs to its label and group. Labels and groups are checked
against the CSVs parsed here independently of the loaders. The real ISIC
subset in ../shared/data is prepared once per module when it is present.
"""

import csv
import os

import numpy as np
from PIL import Image
import pytest

from baq.data import DATASETS
from baq.data.manual import celeba, fitzpatrick17k, folder, isic2019, files as manual_files
from conftest import SHARED_DATA

ISIC_SUBSET = os.path.join(SHARED_DATA, "isic2019_ham_subset")


def _colour(i):
  return np.array([(37 * i) % 200 + 30, (91 * i) % 200 + 30, 128], np.int64)


def _jpeg(path, i, size=(12, 10)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pixels = np.broadcast_to(_colour(i), (size[1], size[0], 3))
  Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    csv.writer(f).writerows([header] + rows)


def _read_csv(path):
  with open(path, newline="") as f:
    return {r[next(iter(r))]: r for r in csv.DictReader(f)}


def _rows_of(table, split):
  return np.flatnonzero(table.splits == manual_files.SPLITS.index(split))


def _check_colours(split, images, index_of):
  """Each stored image has the solid colour of its row."""
  means = split.images.reshape(len(split), -1, 3).mean(1)
  expected = np.array([_colour(index_of[name]) for name in images])
  np.testing.assert_allclose(means, expected, atol=3)


# ISIC 2019 fixture: 36 lesions photographed 1-3 times, 4 images without a
# lesion_id, every class incl. UNK, missing sex and age on a few rows.
@pytest.fixture(name="isic_dir")
def _isic_dir(tmp_path):
  rng = np.random.default_rng(0)
  truth, meta = [], []
  for i in range(64):
    name = f"ISIC_{i:07d}"
    _jpeg(str(tmp_path / isic2019.IMAGES / f"{name}.jpg"), i)
    cls = i % 9
    truth.append([name] + [f"{float(c == cls):.1f}" for c in range(9)])
    lesion = "" if i >= 60 else f"HAM_{i // 5 * 3 + i % 5 // 2:07d}"
    sex = "" if i % 17 == 3 else ("male", "female")[rng.integers(2)]
    age = "" if i % 19 == 5 else f"{5 * rng.integers(3, 17)}.0"
    meta.append([name, age, "trunk", lesion, sex])
  _write_csv(tmp_path / isic2019.GROUND_TRUTH, ["image"] + list(
      isic2019.CLASSES), truth)
  _write_csv(tmp_path / isic2019.METADATA, ["image", "age_approx",
                                            "anatom_site_general",
                                            "lesion_id", "sex"], meta)
  return str(tmp_path)


def test_isic_labels_groups_images_and_lesions_match_the_csvs(isic_dir,
                                                              tmp_path):
  truth = _read_csv(os.path.join(isic_dir, isic2019.GROUND_TRUTH))
  meta = _read_csv(os.path.join(isic_dir, isic2019.METADATA))
  table = isic2019.table(isic_dir)
  names = table.metadata["images"]
  # UNK (7 rows) and missing sex (4 other rows) are dropped.
  dropped = {n for n in truth if truth[n]["UNK"] == "1.0"
             or not meta[n]["sex"]}
  assert len(dropped) == 11 and sorted(names) == sorted(set(truth) - dropped)
  assert table.metadata["class_names"] == list(isic2019.CLASSES[:8])
  index_of = {n: int(n[5:]) for n in truth}
  lesions = []
  for split in manual_files.SPLITS:
    data = isic2019.load_isic2019(split, data_dir=str(tmp_path / "tfds"),
                                  manual_dir=isic_dir, image_size=8)
    images = [names[i] for i in _rows_of(table, split)]
    assert data.class_names == isic2019.CLASSES[:8]
    assert data.group_names == ("female", "male")
    want = [[truth[n][c] for c in isic2019.CLASSES[:8]].index("1.0")
            for n in images]
    np.testing.assert_array_equal(data.labels, want)
    np.testing.assert_array_equal(
        data.groups, [meta[n]["sex"] == "male" for n in images])
    assert set(data.groups) == {0, 1}  # Stratified: both sexes everywhere.
    _check_colours(data, images, index_of)
    lesions.append({meta[n]["lesion_id"] or n for n in images})
  assert sum(map(len, lesions)) == len(set.union(*lesions))  # Disjoint.
  assert len(set.union(*lesions)) < len(names)  # Lesions do repeat.


def test_isic_age_malignant_own_group_and_determinism(isic_dir):
  truth = _read_csv(os.path.join(isic_dir, isic2019.GROUND_TRUTH))
  meta = _read_csv(os.path.join(isic_dir, isic2019.METADATA))
  table = isic2019.table(isic_dir, group_by="age", missing="own_group",
                         label="malignant", unknown="keep",
                         age_edges=(40, 70))
  names = table.metadata["images"]
  assert len(names) == 64
  assert table.metadata["group_names"] == ["<40", "40-69", ">=70", "unknown"]
  ages = [meta[n]["age_approx"] for n in names]
  want = [3 if not a else (float(a) >= 40) + (float(a) >= 70) for a in ages]
  np.testing.assert_array_equal(table.fields["group"], want)
  malignant = [sum(truth[n][c] == "1.0" for c in ("MEL", "BCC", "AK", "SCC"))
               for n in names]
  np.testing.assert_array_equal(table.fields["label"], malignant)
  again = isic2019.table(isic_dir, group_by="age", missing="own_group",
                         label="malignant", unknown="keep",
                         age_edges=(40, 70))
  np.testing.assert_array_equal(table.splits, again.splits)
  other = isic2019.table(isic_dir, group_by="age", missing="own_group",
                         label="malignant", unknown="keep",
                         age_edges=(40, 70), seed=1)
  assert np.any(table.splits != other.splits)
  # Each of the 4 groups is split within one lesion of (0.7, 0.1, 0.2).
  lesions = [meta[n]["lesion_id"] or n for n in names]
  first = np.unique(lesions, return_index=True)[1]
  counts = np.bincount(table.splits[first], minlength=3)
  assert np.all(np.abs(counts - len(first) * np.array([.7, .1, .2])) <= 4)


def test_isic_missing_files_and_bad_options_are_named(isic_dir):
  os.remove(os.path.join(isic_dir, isic2019.METADATA))
  with pytest.raises(FileNotFoundError,
                     match=f"missing {isic2019.METADATA} in {isic_dir}"):
    isic2019.table(isic_dir)
  with pytest.raises(ValueError, match="manual_dir"):
    isic2019.load_isic2019("train")
  with pytest.raises(ValueError, match="unknown group_by 'race'.*'age', 'sex'"):
    isic2019.table(isic_dir, group_by="race")
  with pytest.raises(ValueError, match="fractions"):
    isic2019.make_options(fractions=(0.5, 0.5, 0.5))


def test_missing_images_error_lists_them_or_skips(isic_dir):
  for i in (6, 7):
    os.remove(os.path.join(isic_dir, isic2019.IMAGES, f"ISIC_{i:07d}.jpg"))
  with pytest.raises(FileNotFoundError,
                     match=r"2 of 53 images .* \(e\.g\. ISIC_0000006\.jpg, "
                           r"ISIC_0000007\.jpg\)"):
    isic2019.table(isic_dir)
  assert len(isic2019.table(isic_dir, missing_images="skip").paths) == 51


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


# Fitzpatrick17k fixture: the real columns, types -1 and 1..6.
@pytest.fixture(name="fitz_dir")
def _fitz_dir(tmp_path):
  rows = []
  for i in range(42):
    md5 = f"{i:032x}"
    _jpeg(str(tmp_path / "images" / f"{md5}.jpg"), i)
    three = ("benign", "malignant", "non-neoplastic")[i % 3]
    rows.append([md5, str(i % 7 if i % 7 else -1), str((i + 1) % 6 + 1),
                 f"disease {i % 4}", f"nine {i % 5}", three, "", "http://x",
                 "httpx"])
  _write_csv(tmp_path / "fitzpatrick17k.csv",
             ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label",
              "nine_partition_label", "three_partition_label", "qc", "url",
              "url_alphanum"], rows)
  return str(tmp_path)


def test_fitzpatrick_groups_labels_and_images(fitz_dir, tmp_path):
  rows = _read_csv(os.path.join(fitz_dir, "fitzpatrick17k.csv"))
  index_of = {h: int(h, 16) for h in rows}
  table = fitzpatrick17k.table(fitz_dir)
  assert len(table.paths) == 36  # The six rows of type -1 are left out.
  for split in manual_files.SPLITS:
    data = fitzpatrick17k.load_fitzpatrick17k(
        split, data_dir=str(tmp_path / "tfds"), manual_dir=fitz_dir,
        image_size=4)
    hashes = [table.metadata["images"][i] for i in _rows_of(table, split)]
    assert data.group_names == ("I", "II", "III", "IV", "V", "VI")
    assert data.class_names == ("benign", "malignant", "non-neoplastic")
    np.testing.assert_array_equal(
        data.groups, [int(rows[h]["fitzpatrick_scale"]) - 1 for h in hashes])
    np.testing.assert_array_equal(data.labels, [
        data.class_names.index(rows[h]["three_partition_label"])
        for h in hashes])
    assert set(data.groups) == set(range(6))  # Six rows a type: all present.
    _check_colours(data, hashes, index_of)
  binary = fitzpatrick17k.table(fitz_dir, groups="binary", label_column="label",
                                type_column="fitzpatrick_centaur")
  hashes = binary.metadata["images"]
  assert binary.metadata["group_names"] == ["I-III", "IV-VI"]
  assert binary.metadata["class_names"] == [f"disease {k}" for k in range(4)]
  np.testing.assert_array_equal(binary.fields["group"], [
      int(rows[h]["fitzpatrick_centaur"]) >= 4 for h in hashes])


def test_fitzpatrick_missing_images_and_options(fitz_dir):
  for i in (1, 2, 3):
    os.remove(os.path.join(fitz_dir, "images", f"{i:032x}.jpg"))
  with pytest.raises(FileNotFoundError, match="3 of 36 images listed in"):
    fitzpatrick17k.table(fitz_dir)
  assert len(fitzpatrick17k.table(fitz_dir, missing_images="skip").paths) == 33
  with pytest.raises(ValueError, match="'three_partition_label', "
                                       "'nine_partition_label', 'label'"):
    fitzpatrick17k.table(fitz_dir, label_column="diagnosis")
  with pytest.raises(FileNotFoundError, match="missing fitz.csv"):
    fitzpatrick17k.table(fitz_dir, csv_file="fitz.csv")


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


# The real ISIC 2019 (HAM10000) subset, prepared once for the module.
@pytest.fixture(name="isic_subset", scope="module")
def _isic_subset(tmp_path_factory):
  if not os.path.isdir(ISIC_SUBSET):
    pytest.skip(f"the shared ISIC 2019 subset is absent ({ISIC_SUBSET})")
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return {split: isic2019.load_isic2019(split, data_dir=data_dir,
                                        manual_dir=ISIC_SUBSET)
          for split in manual_files.SPLITS}


def test_isic_subset_counts_groups_and_lesions(isic_subset):
  meta = _read_csv(os.path.join(ISIC_SUBSET, isic2019.METADATA))
  assert sum(map(len, isic_subset.values())) == 5948  # 36 without sex.
  groups = np.concatenate([s.groups for s in isic_subset.values()])
  assert isic_subset["train"].group_names == ("female", "male")
  np.testing.assert_array_equal(np.bincount(groups), [2737, 3211])
  labels = np.concatenate([s.labels for s in isic_subset.values()])
  assert isic_subset["test"].class_names == ("MEL", "NV", "BCC", "AK", "BKL",
                                             "DF", "VASC")
  assert isic_subset["test"].images.shape[1:] == (64, 64, 3)
  table = isic2019.table(ISIC_SUBSET)
  np.testing.assert_array_equal(
      labels, np.concatenate([table.fields["label"][_rows_of(table, s)]
                              for s in manual_files.SPLITS]))
  lesions = [{meta[table.metadata["images"][i]]["lesion_id"]
              for i in _rows_of(table, s)} for s in manual_files.SPLITS]
  assert sum(map(len, lesions)) == len(set.union(*lesions)) == 5948
  for split, want in zip(manual_files.SPLITS, (.7, .1, .2)):
    share = np.bincount(isic_subset[split].groups, minlength=2) / [2737, 3211]
    np.testing.assert_allclose(share, want, atol=0.002)
  # The stored pixels are the files' own (64x64: no resize).
  first = table.metadata["images"][_rows_of(table, "validation")[0]]
  with Image.open(os.path.join(ISIC_SUBSET, isic2019.IMAGES,
                               first + ".jpg")) as img:
    np.testing.assert_array_equal(isic_subset["validation"].images[0],
                                  np.asarray(img.convert("RGB")))


def test_isic_subset_tables_own_group_and_age():
  if not os.path.isdir(ISIC_SUBSET):
    pytest.skip(f"the shared ISIC 2019 subset is absent ({ISIC_SUBSET})")
  own = isic2019.table(ISIC_SUBSET, missing="own_group")
  np.testing.assert_array_equal(np.bincount(own.fields["group"]),
                                [2737, 3211, 36])
  age = isic2019.table(ISIC_SUBSET, group_by="age")
  assert age.metadata["group_names"] == ["<30", "30-59", ">=60"]
  np.testing.assert_array_equal(np.bincount(age.fields["group"]),
                                [318, 3623, 2007])
  names = own.metadata["class_names"]
  counts = dict(zip(names, np.bincount(own.fields["label"])))
  assert counts == {"NV": 4323, "BKL": 583, "MEL": 491, "BCC": 264, "AK": 183,
                    "VASC": 80, "DF": 60}
  malignant = isic2019.table(ISIC_SUBSET, label="malignant",
                             missing="own_group")
  assert np.bincount(malignant.fields["label"]).tolist() == [
      4323 + 583 + 80 + 60, 491 + 264 + 183]
