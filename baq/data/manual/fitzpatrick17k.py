"""Fitzpatrick17k clinical images from manually placed files, by skin type.

Fitzpatrick17k (Groh et al., 2021) is a CSV of 16,577 clinical images with
their Fitzpatrick skin type and diagnosis; the images themselves are fetched
by the user from the CSV's `url` column. Place in one folder (`manual_dir`):

    fitzpatrick17k.csv     md5hash, fitzpatrick_scale, fitzpatrick_centaur,
                           label, nine_partition_label,
                           three_partition_label, qc, url, url_alphanum
    images/{md5hash}.jpg   one image per row

The config's `dataset.kwargs`:

    manual_dir, image_size=64, center_crop=False,
    groups='six' | 'binary'            types I..VI, or I-III vs IV-VI
    type_column='fitzpatrick_scale' | 'fitzpatrick_centaur'
    label_column='three_partition_label' | 'nine_partition_label' | 'label'
    missing_images='error' | 'skip'    rows whose image file is absent
    fractions=(0.7, 0.1, 0.2), seed=0, csv_file, images_dir

Rows whose skin type is -1 (not labelled) are left out. Classes are the
label column's values in sorted order; groups are fixed by `groups` (group
id = type - 1 for 'six', as in `synthetic_derm`), so a group may be empty.
The split is seeded, stratified by group and label, and keeps rows with the
same md5hash (duplicate images) together.
"""

from __future__ import annotations

import os


from baq.data.manual import builder as manual, files as manual_files

TITLE = "Fitzpatrick17k"
_SOURCE = "https://github.com/mattgroh/fitzpatrick17k"
SIX = ("I", "II", "III", "IV", "V", "VI")
BINARY = ("I-III", "IV-VI")
LABEL_COLUMNS = ("three_partition_label", "nine_partition_label", "label")
TYPE_COLUMNS = ("fitzpatrick_scale", "fitzpatrick_centaur")


def make_options(groups: str = "six", type_column: str = "fitzpatrick_scale",
                 label_column: str = "three_partition_label",
                 missing_images: str = "error",
                 fractions=manual_files.DEFAULT_FRACTIONS, seed: int = 0,
                 csv_file: str = "fitzpatrick17k.csv",
                 images_dir: str = "images") -> dict:
  """Validates the options (see the module docstring) into a plain dict."""
  manual_files.choose(TITLE, "groups", groups, ("six", "binary"))
  manual_files.choose(TITLE, "type_column", type_column, TYPE_COLUMNS)
  manual_files.choose(TITLE, "label_column", label_column, LABEL_COLUMNS)
  manual_files.choose(TITLE, "missing_images", missing_images, ("error", "skip"))
  return dict(groups=groups, type_column=type_column,
              label_column=label_column, missing_images=missing_images,
              fractions=list(manual_files.check_fractions(fractions)),
              seed=int(seed), csv_file=csv_file, images_dir=images_dir)


def _files(options: dict) -> dict:
  return {
      options["csv_file"]: f"the Fitzpatrick17k CSV from {_SOURCE}",
      options["images_dir"]: ("a folder of {md5hash}.jpg images, fetched "
                              f"from the CSV's url column (see {_SOURCE})"),
  }


def table(manual_dir: str, **options) -> manual.Table:
  """Reads the CSV into a `manual.Table` (no images are decoded).

  Args:
    manual_dir: folder with the CSV and the image folder.
    **options: `make_options` arguments.

  Returns:
    The table; `fields` holds `label` and `group`, `metadata` the class and
    group names and each kept row's md5hash (`images`).
  """
  options = make_options(**options)
  manual_dir = manual_files.require(TITLE, manual_dir, _files(options))
  csv_path = os.path.join(manual_dir, options["csv_file"])
  type_column, label_column = options["type_column"], options["label_column"]
  rows = manual_files.read_csv(TITLE, csv_path,
                         ("md5hash", type_column, label_column))
  kept = []
  for row in rows:
    skin = int(float(row[type_column] or -1))  # Empty: not labelled.
    if skin == -1:
      continue  # Skin type not labelled.
    if not 1 <= skin <= 6:
      raise ValueError(f"{TITLE}: {type_column} of {row['md5hash']} is "
                       f"{skin}; expected 1..6 or -1.")
    group = skin - 1 if options["groups"] == "six" else int(skin >= 4)
    kept.append((row["md5hash"], row[label_column].strip(), group, row.line))
  image_dir = os.path.join(manual_dir, options["images_dir"])
  paths = [os.path.join(image_dir, r[0] + ".jpg") for r in kept]
  keep = manual_files.find_missing_images(TITLE, paths, options["missing_images"],
                                          csv_path, [r[3] for r in kept])
  kept = [r for r, k in zip(kept, keep) if k]
  class_names = sorted({r[1] for r in kept})
  hashes = [r[0] for r in kept]
  return manual.labelled_table(
      paths, keep, hashes, [class_names.index(r[1]) for r in kept], [r[2] for r in kept],
      options, class_names=class_names,
      group_names=list(SIX if options["groups"] == "six" else BINARY), images=hashes)


load_fitzpatrick17k = manual.register_manual(
    "fitzpatrick17k", table, title=TITLE, files=_files,
    make_options=make_options,
    description="Fitzpatrick17k images from a manual directory.")
