"""CelebA faces from the official files, target and sensitive attribute chosen.

Place the official CelebA files (https://mmlab.ie.cuhk.edu.hk/projects/
CelebA.html, "Align&Cropped Images" and "Anno"/"Eval") in one folder, the
config's `manual_dir`:

    img_align_celeba/000001.jpg ...   (unzipped img_align_celeba.zip)
    list_attr_celeba.txt              40 attributes, +1/-1 per image
    list_eval_partition.txt           0 train, 1 validation, 2 test

The Kaggle re-packaging is read too: `list_attr_celeba.csv`,
`list_eval_partition.csv` and the nested `img_align_celeba/img_align_celeba/`.
The official partition gives the splits. The config's `dataset.kwargs`:

    manual_dir, image_size=64, center_crop=True (178x218 -> central 178x178),
    target_attribute='Blond_Hair', sensitive_attribute='Male'

All 40 attributes are stored at preparation, so the target and sensitive
attribute are picked when a split is loaded and changing them reuses the
prepared files; only image_size and center_crop shape them. Labels are
1 where the target attribute is present; groups 1 where the sensitive one is.

Why not tensorflow-datasets' own `celeb_a` builder (tfds 4.9.10)? It was
tried with the five files placed in a manual directory and cannot run here:
  * it only reads files through `dl_manager.download` of Google-Drive URLs; a
    manual directory is accepted solely for the exact files of its
    checksums.tsv (the zip, not the unzipped folder, plus the landmark and
    identity lists), so any other copy fails with NonMatchingChecksumError;
  * it iterates the zip with `dl_manager.iter_archive`, which opens it through
    `tf.io.gfile`: ModuleNotFoundError without TensorFlow (and its
    `code_path` first needs the absent `importlib_resources`);
  * it stores full 218x178 JPEGs as `tfds.features.Image`, so every load
    would decode and resize all 202,599 images again.
This builder reads the same official files with the csv module and PIL and
writes `Tensor` features to `array_record`, like the other baq datasets.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from baq.data.manual import builder as manual, files as manual_files
from baq.data.datasets import Split

TITLE = "CelebA"
_SOURCE = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
IMAGES = "img_align_celeba"
ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs "
    "Big_Lips Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair "
    "Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair "
    "Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache "
    "Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings "
    "Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
FILES = {
    IMAGES: f"the unzipped img_align_celeba.zip from {_SOURCE}",
    "list_attr_celeba.txt": f"Anno/list_attr_celeba.txt from {_SOURCE}",
    "list_eval_partition.txt": f"Eval/list_eval_partition.txt from {_SOURCE}",
}


def _read_list(path: str, attributes: bool) -> tuple[list, dict]:
  """Reads an official list (.txt) or its Kaggle form (.csv).

  Returns:
    (column names, {image file name: list of ints}).
  """
  with open(path, newline="", encoding="utf-8-sig") as f:
    if path.endswith(".csv"):
      rows = list(csv.reader(f))
      header, body = rows[0][1:], rows[1:]
    else:
      lines = [line.split() for line in f if line.strip()]
      # The attribute list opens with a count line and a header line.
      header, body = (lines[1], lines[2:]) if attributes else (["split"],
                                                               lines)
  return header, {r[0]: [int(v) for v in r[1:]] for r in body}


def _locate(manual_dir: str) -> dict:
  """Finds the images and the two lists, .txt or Kaggle .csv."""
  files, found = {}, {}
  for key, name in (("images", IMAGES), ("attr", "list_attr_celeba.txt"),
                    ("partition", "list_eval_partition.txt")):
    kaggle = name.replace(".txt", ".csv")
    if kaggle != name and os.path.exists(os.path.join(manual_dir or "",
                                                      kaggle)):
      files[kaggle], found[key] = FILES[name], kaggle
    else:
      files[name], found[key] = FILES[name], name
  manual_dir = manual_files.require(TITLE, manual_dir, files)
  paths = {k: os.path.join(manual_dir, v) for k, v in found.items()}
  if os.path.isdir(os.path.join(paths["images"], IMAGES)):  # Kaggle nests it.
    paths["images"] = os.path.join(paths["images"], IMAGES)
  return paths


def table(manual_dir: str) -> manual.Table:
  """Reads the lists into a `manual.Table` (no images are decoded).

  Args:
    manual_dir: folder with the official files (module docstring).

  Returns:
    The table, in file-name order; `fields` holds `attributes` uint8 [n, 40]
    (1 present, 0 absent), `metadata` the attribute names.
  """
  paths = _locate(manual_dir)
  names, attrs = _read_list(paths["attr"], attributes=True)
  if sorted(names) != sorted(ATTRIBUTES):
    raise ValueError(f"{TITLE}: {paths['attr']} has attributes {names}; "
                     f"expected the 40 CelebA attributes {ATTRIBUTES}.")
  _, partition = _read_list(paths["partition"], attributes=False)
  files = sorted(partition)
  absent = [f for f in files if f not in attrs]
  if absent:
    raise ValueError(f"{TITLE}: {len(absent)} images of {paths['partition']} "
                     f"have no attributes in {paths['attr']}, e.g. "
                     f"{', '.join(absent[:5])}.")
  splits = np.asarray([partition[f][0] for f in files], np.int8)
  if not np.isin(splits, (0, 1, 2)).all():
    raise ValueError(f"{TITLE}: {paths['partition']} has partitions "
                     f"{sorted(set(splits.tolist()))}; expected 0, 1, 2.")
  image_paths = [os.path.join(paths["images"], f) for f in files]
  manual_files.find_missing_images(TITLE, image_paths, "error", paths["partition"])
  order = [names.index(a) for a in ATTRIBUTES]
  values = np.asarray([attrs[f] for f in files], np.int64)[:, order]
  return manual.Table(
      paths=image_paths,
      splits=splits,
      fields={"attributes": (values > 0).astype(np.uint8)},
      metadata={"attribute_names": ATTRIBUTES, "images": files})


def make_options(target_attribute: str = "Blond_Hair",
                 sensitive_attribute: str = "Male") -> dict:
  """Validates the attribute choice, applied when a split is read.

  Args:
    target_attribute: the attribute predicted (label 1 where present).
    sensitive_attribute: the attribute that defines the groups.

  Returns:
    The two names, as a dict.
  """
  manual_files.choose(TITLE, "target_attribute", target_attribute, ATTRIBUTES)
  manual_files.choose(TITLE, "sensitive_attribute", sensitive_attribute,
                      ATTRIBUTES)
  return dict(target_attribute=target_attribute,
              sensitive_attribute=sensitive_attribute)


def to_split(data: dict, meta: dict, name: str, target_attribute: str,
             sensitive_attribute: str) -> Split:
  """The `Split` of the stored attributes, labelled and grouped by two of them.

  Args:
    data: `load_table` arrays: `image` and `attributes` [n, 40] (0/1).
    meta: the prepared files' metadata (unused: the order is `ATTRIBUTES`).
    name: the split's name, e.g. 'celeba/train'.
    target_attribute: labels are 1 where it is present.
    sensitive_attribute: groups are 1 where it is present.

  Returns:
    The `Split`, in file-name order.
  """
  del meta
  attrs = data["attributes"]
  target = ATTRIBUTES.index(target_attribute)
  sensitive = ATTRIBUTES.index(sensitive_attribute)
  return Split(
      images=data["image"], labels=attrs[:, target].astype(np.int32),
      groups=attrs[:, sensitive].astype(np.int32), num_classes=2,
      num_groups=2, class_names=(f"not {target_attribute}", target_attribute),
      group_names=(f"not {sensitive_attribute}", sensitive_attribute),
      name=name)


# Only image_size and center_crop shape the prepared files: the attributes
# are picked when a split is read, so changing them reuses the files.
load_celeba = manual.register_manual(
    "celeba", table, title=TITLE, files=FILES, make_options=make_options,
    fields={"attributes": ((len(ATTRIBUTES),), np.uint8)},
    make_split=to_split, read_options=("target_attribute",
                                       "sensitive_attribute"),
    center_crop=True,
    description="CelebA aligned faces from a manual directory.")
