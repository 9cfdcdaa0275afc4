"""Tests of the dermatology loaders: ISIC 2019 and Fitzpatrick17k.

Tiny fixtures in the official file formats are written to tmp_path, with
solid-colour JPEGs whose colour encodes the row, so a test can tell that each
stored image belongs to its label and group. Labels and groups are checked
against the CSVs parsed here independently of the loaders. The real ISIC
subset in ../shared/data is prepared once per module when it is present.
test_manual_files.py uses the fixture helpers defined here.
"""

import csv
import os

import numpy as np
from PIL import Image
import pytest

from baq.data.manual import fitzpatrick17k, isic2019, files as manual_files
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
