"""Any image folder with a CSV of labels and groups, as a baq dataset.

For data that has no loader of its own: a folder of images and a CSV with
one row per image. Place both in the config's `manual_dir`:

    labels.csv       e.g. image,label,group[,split][,patient]
    images/...       the files the image column names

The config's `dataset.kwargs` (all but manual_dir optional):

    manual_dir, image_size=64, center_crop=False,
    csv_file='labels.csv', images_dir='images', image_suffix=''
    image_column='image', label_column='label', group_column='group'
    split_column=None     values train / validation (or val, valid, dev) /
                          test; without it a seeded split is drawn
    id_column=None        rows sharing an id (a patient, a lesion) never
                          sit in two splits of the seeded split
    missing_group='drop' | 'own_group'   rows with an empty group
    missing_images='error' | 'skip'
    fractions=(0.7, 0.1, 0.2), seed=0

Label and group values are mapped to ids in sorted order (numerically when
every value is a number), and their names kept as `class_names` and
`group_names`; an empty group becomes the last group, 'unknown', with
`missing_group='own_group'`. Rows with an empty label are left out. Image
paths are relative to `images_dir`, with `image_suffix` appended (e.g. '.jpg'
when the column holds bare ids).
"""

from __future__ import annotations

import os

import numpy as np

from baq.data.manual import builder as manual, files as manual_files

TITLE = "image_folder_csv"
SPLIT_VALUES = {"train": 0, "validation": 1, "val": 1, "valid": 1, "dev": 1,
                "test": 2}


def make_options(csv_file: str = "labels.csv", images_dir: str = "images",
                 image_suffix: str = "", image_column: str = "image",
                 label_column: str = "label", group_column: str = "group",
                 split_column: str | None = None, id_column: str | None = None,
                 missing_group: str = "drop", missing_images: str = "error",
                 fractions=manual_files.DEFAULT_FRACTIONS, seed: int = 0) -> dict:
  """Validates the options (see the module docstring) into a plain dict."""
  manual_files.choose(TITLE, "missing_group", missing_group, ("drop", "own_group"))
  manual_files.choose(TITLE, "missing_images", missing_images, ("error", "skip"))
  return dict(csv_file=csv_file, images_dir=images_dir,
              image_suffix=image_suffix, image_column=image_column,
              label_column=label_column, group_column=group_column,
              split_column=split_column, id_column=id_column,
              missing_group=missing_group, missing_images=missing_images,
              fractions=list(manual_files.check_fractions(fractions)),
              seed=int(seed))


def sorted_values(values) -> list[str]:
  """Distinct values, sorted numerically if all are numbers, else as text."""
  values = sorted(set(values))
  try:
    return sorted(values, key=float)
  except ValueError:
    return values


def _files(options: dict) -> dict:
  return {options["csv_file"]: "the CSV with one row per image",
          options["images_dir"] or ".": "the folder of images it names"}


def table(manual_dir: str, **options) -> manual.Table:
  """Reads the CSV into a `manual.Table` (no images are decoded).

  Args:
    manual_dir: folder with the CSV and the image folder.
    **options: `make_options` arguments.

  Returns:
    The table; `fields` holds `label` and `group`, `metadata` the class and
    group names, each kept row's image value (`images`) and the number of
    rows left out for an empty label or group.
  """
  o = make_options(**options)
  manual_dir = manual_files.require(TITLE, manual_dir, _files(o))
  csv_path = os.path.join(manual_dir, o["csv_file"])
  columns = [o["image_column"], o["label_column"], o["group_column"]]
  columns += [c for c in (o["split_column"], o["id_column"]) if c]
  rows = manual_files.read_csv(TITLE, csv_path, columns)
  unlabelled = sum(not r[o["label_column"]].strip() for r in rows)
  rows = [r for r in rows if r[o["label_column"]].strip()]
  ungrouped = sum(not r[o["group_column"]].strip() for r in rows)
  if o["missing_group"] == "drop":
    rows = [r for r in rows if r[o["group_column"]].strip()]
  image_dir = os.path.join(manual_dir, o["images_dir"])
  paths = [os.path.join(image_dir, r[o["image_column"]] + o["image_suffix"])
           for r in rows]
  keep = manual_files.find_missing_images(TITLE, paths, o["missing_images"],
                                          csv_path, [r.line for r in rows])
  rows = [r for r, k in zip(rows, keep) if k]
  class_names = sorted_values(r[o["label_column"]].strip() for r in rows)
  group_values = [r[o["group_column"]].strip() for r in rows]
  group_names = sorted_values(g for g in group_values if g)
  if o["missing_group"] == "own_group" and ungrouped:
    group_names.append("unknown")
  labels = np.asarray([class_names.index(r[o["label_column"]].strip())
                       for r in rows], np.int64)
  groups = np.asarray([group_names.index(g or "unknown")
                       for g in group_values], np.int64)
  if o["split_column"]:
    values = [r[o["split_column"]].strip().lower() for r in rows]
    for value in set(values):
      manual_files.choose(TITLE, f"value of {o['split_column']}", value,
                    list(SPLIT_VALUES))
    splits = np.asarray([SPLIT_VALUES[v] for v in values], np.int8)
  else:
    units = ([r[o["id_column"]] for r in rows] if o["id_column"]
             else list(range(len(rows))))
    splits = manual_files.assign_splits(units, groups, labels, o["fractions"],
                                  o["seed"])
  return manual.Table(
      paths=[p for p, k in zip(paths, keep) if k], splits=splits,
      fields={"label": labels, "group": groups},
      metadata={"class_names": class_names, "group_names": group_names,
                "images": [r[o["image_column"]] for r in rows],
                "dropped_unlabelled": unlabelled,
                "dropped_ungrouped": (ungrouped if o["missing_group"] == "drop"
                                      else 0)})


load_image_folder_csv = manual.register_manual(
    "image_folder_csv", table, title=TITLE, files=_files,
    make_options=make_options,
    description="Images and a CSV from a manual directory.")
