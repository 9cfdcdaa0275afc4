"""Loads FairFace (fairface_label_{train,val}.csv) lazily: image paths and group codes.

FairFace (Karkkainen & Joo, WACV 2021, github.com/joojs/fairface) ships face
crops in train/ and val/ and one label file per split with the columns

  file          the image path relative to the dataset root, e.g. val/1.jpg
  age           0-2, 3-9, 10-19, 20-29, 30-39, 40-49, 50-59, 60-69, more than 70
  gender        Male, Female
  race          White, Black, Latino_Hispanic, East Asian, Southeast Asian,
                Indian, Middle Eastern
  service_test  True / False: the subset balanced for testing services

Group codes follow the orders above (age in increasing order, race in the
order of FairFace's README), so the same name has the same code in every
split. Retrieval-bias studies (Berg et al. 2022) rank the val split's
images. Images are not decoded here: pass the paths to
`baq.data.vlm.read_images`.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import numpy as np

from baq.data.manual import files

TITLE = "FairFace"
SPLITS = ("train", "val")
COLUMNS = ("file", "age", "gender", "race", "service_test")
GROUPS = {
    "age": ("0-2", "3-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60-69",
            "more than 70"),
    "gender": ("Male", "Female"),
    "race": ("White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian",
             "Indian", "Middle Eastern"),
}
_BOOLS = {"true": True, "false": False}


class FairFace(NamedTuple):
  """FairFace rows as parallel arrays (one entry per image, file order)."""
  paths: list        # str [n] absolute image paths
  attributes: dict   # 'age', 'gender', 'race' -> int32 [n] group codes
  names: dict        # the same keys -> list of group names (code order)


def label_file(split: str) -> str:
  """The label CSV's name of a split, e.g. fairface_label_val.csv."""
  return f"fairface_label_{files.choose(TITLE, 'split', split, SPLITS)}.csv"


def _codes(rows: list, column: str, path: str) -> np.ndarray:
  """Group codes of one attribute column; an unknown value names its line."""
  lookup = {name: i for i, name in enumerate(GROUPS[column])}
  out = np.empty(len(rows), np.int32)
  for i, row in enumerate(rows):
    value = row[column].strip()
    if value not in lookup:
      raise ValueError(
          f"{TITLE}: {path} line {row.line} ({row['file']}): {column} "
          f"{value!r} is not one of {', '.join(repr(v) for v in GROUPS[column])}.")
    out[i] = lookup[value]
  return out


def _service_test(row: files.Row, path: str) -> bool:
  value = row["service_test"].strip().lower()
  if value not in _BOOLS:
    raise ValueError(f"{TITLE}: {path} line {row.line} ({row['file']}): "
                     f"service_test {row['service_test']!r} is not True or False.")
  return _BOOLS[value]


def load_fairface(root: str, split: str = "val", service_test: Optional[bool] = None,
                  missing_images: str = "error") -> FairFace:
  """Reads fairface_label_{split}.csv and resolves its images under `root`.

  Args:
    root: the dataset folder holding the label CSVs and train/, val/.
    split: 'train' or 'val'.
    service_test: None keeps every row; True (False) keeps only the rows
      whose service_test is True (False).
    missing_images: 'error' raises when a listed image is absent; 'skip'
      leaves those rows out. Images are only checked for presence here.

  Returns:
    A `FairFace` (paths, attributes, names); it unpacks as a 3-tuple.

  Raises:
    ValueError: an unknown split or policy (the valid ones are listed),
      missing columns (listed by name), or an unknown group value or
      service_test flag (the message names the line and the file).
    FileNotFoundError: the label CSV is missing (named, with where it comes
      from), or (policy 'error') images are missing: the message names each
      (up to five) with its line in the CSV.
  """
  name = label_file(split)
  files.choose(TITLE, "missing_images", missing_images, ("error", "skip"))
  root = files.require(TITLE, root, {
      name: "the label file of github.com/joojs/fairface (FairFace's README "
            "links the labels and the padding=0.25 images)"})
  path = os.path.join(root, name)
  rows = files.read_csv(TITLE, path, COLUMNS)
  if service_test is not None:
    rows = [r for r in rows if _service_test(r, path) == bool(service_test)]
  else:
    for r in rows:
      _service_test(r, path)  # A bad flag is an error whichever rows are kept.
  image_paths = [os.path.join(root, r["file"].strip()) for r in rows]
  present = [os.path.isfile(p) for p in image_paths]
  if missing_images == "error" and not all(present):
    gone = [f"line {r.line}: {r['file']} ({p})" for r, p, ok
            in zip(rows, image_paths, present) if not ok]
    more = f"; and {len(gone) - 5} more" if len(gone) > 5 else ""
    raise FileNotFoundError(
        f"{TITLE}: {len(gone)} of {len(rows)} images listed in {path} are "
        f"missing: {'; '.join(gone[:5])}{more}. Add them, or pass "
        "missing_images='skip' to leave those rows out.")
  rows = [r for r, ok in zip(rows, present) if ok]
  return FairFace(
      paths=[p for p, ok in zip(image_paths, present) if ok],
      attributes={c: _codes(rows, c, path) for c in GROUPS},
      names={c: list(v) for c, v in GROUPS.items()})
