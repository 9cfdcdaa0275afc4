"""ISIC 2019 dermoscopy images from manually placed files, by sex or age.

Download the ISIC 2019 training set from https://challenge.isic-archive.com
/data/#2019 and place in one folder (the `manual_dir` of the config):

    ISIC_2019_Training_Input/ISIC_0000000.jpg ...   (unzipped images)
    ISIC_2019_Training_GroundTruth.csv   image + one-hot MEL,NV,...,SCC,UNK
    ISIC_2019_Training_Metadata.csv      image, age_approx,
                                         anatom_site_general, lesion_id, sex

The config's `dataset.kwargs`:

    manual_dir, image_size=64, center_crop=False,
    group_by='sex' | 'age',          age_edges=(30, 60): <30, 30-59, >=60
    missing='drop' | 'own_group',    rows without sex/age: dropped or 'unknown'
    label='diagnosis' | 'malignant', unknown='drop' | 'keep' (UNK rows)
    fractions=(0.7, 0.1, 0.2), seed=0, missing_images='error' | 'skip'

Groups are fixed by the options (female, male / the age bands, then
'unknown' with `missing='own_group'`), so a group may be empty; diagnosis
classes are those present in the kept rows, in the ground truth's column
order. 'malignant' is MEL, BCC, AK and SCC against the rest. The split is by
`lesion_id` (an image without one is its own lesion), so no lesion sits in
two splits, and is stratified by group and, within a group, by label.
"""

from __future__ import annotations

import os

import numpy as np

from baq.data.manual import builder as manual, files as manual_files

TITLE = "ISIC 2019"
IMAGES = "ISIC_2019_Training_Input"
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
MALIGNANT = ("MEL", "BCC", "AK", "SCC")
SEXES = ("female", "male")
_SOURCE = "https://challenge.isic-archive.com/data/#2019 (ISIC 2019 training)"
FILES = {
    IMAGES: f"the unzipped ISIC_2019_Training_Input.zip from {_SOURCE}",
    GROUND_TRUTH: f"download it from {_SOURCE}",
    METADATA: f"download it from {_SOURCE}",
}


def make_options(group_by: str = "sex", missing: str = "drop",
                 label: str = "diagnosis", unknown: str = "drop",
                 age_edges=(30, 60), fractions=manual_files.DEFAULT_FRACTIONS,
                 seed: int = 0, missing_images: str = "error") -> dict:
  """Validates the options (see the module docstring) into a plain dict."""
  manual_files.choose(TITLE, "group_by", group_by, ("age", "sex"))
  manual_files.choose(TITLE, "missing", missing, ("drop", "own_group"))
  manual_files.choose(TITLE, "label", label, ("diagnosis", "malignant"))
  manual_files.choose(TITLE, "unknown", unknown, ("drop", "keep"))
  manual_files.choose(TITLE, "missing_images", missing_images, ("error", "skip"))
  edges = [int(e) for e in (age_edges or (30, 60))]
  if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
    raise ValueError(f"{TITLE}: age_edges must be increasing, got {edges}.")
  return dict(group_by=group_by, missing=missing, label=label,
              unknown=unknown, age_edges=edges if group_by == "age" else None,
              fractions=list(manual_files.check_fractions(fractions)),
              seed=int(seed), missing_images=missing_images)


def age_band_names(edges) -> tuple[str, ...]:
  """Names of the age bands cut at `edges`, e.g. ('<30', '30-59', '>=60')."""
  inner = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])]
  return (f"<{edges[0]}", *inner, f">={edges[-1]}")


def _group_names(options: dict) -> tuple[str, ...]:
  names = (SEXES if options["group_by"] == "sex"
           else age_band_names(options["age_edges"]))
  return names + (("unknown",) if options["missing"] == "own_group" else ())


def _group_of(meta: dict, options: dict) -> int | None:
  """Group id of one metadata row; None when the attribute is missing."""
  if options["group_by"] == "sex":
    value = (meta.get("sex") or "").strip().lower()
    if value and value not in SEXES:
      raise ValueError(f"{TITLE}: unexpected sex {value!r} for image "
                       f"{meta['image']}; expected one of {SEXES} or empty.")
    return SEXES.index(value) if value else None
  value = (meta.get("age_approx") or "").strip()
  if not value:
    return None
  return int(np.searchsorted(options["age_edges"], float(value), "right"))


def table(manual_dir: str, **options) -> manual.Table:
  """Reads the CSVs into a `manual.Table` (no images are decoded).

  Args:
    manual_dir: folder with the ISIC 2019 files (see the module docstring).
    **options: `make_options` arguments.

  Returns:
    The table; `fields` holds `label` and `group`, and `metadata` the class
    and group names, each kept image's id (`images`) and lesion (`lesions`).
  """
  options = make_options(**options)
  manual_dir = manual_files.require(TITLE, manual_dir, FILES)
  truth = manual_files.read_csv(TITLE, os.path.join(manual_dir, GROUND_TRUTH),
                          ("image",) + CLASSES)
  metadata = {row["image"]: row for row in manual_files.read_csv(
      TITLE, os.path.join(manual_dir, METADATA), ("image", "lesion_id"))}
  no_group = len(_group_names(options)) - 1
  rows = []
  for row in truth:
    onehot = np.array([float(row[c] or 0) for c in CLASSES])
    if onehot.max() != 1 or onehot.sum() != 1:
      raise ValueError(f"{TITLE}: {GROUND_TRUTH} row {row['image']} is not "
                       f"one-hot over {CLASSES}.")
    diagnosis = CLASSES[int(onehot.argmax())]
    meta = metadata.get(row["image"], {"image": row["image"]})
    group = _group_of(meta, options)
    if diagnosis == "UNK" and options["unknown"] == "drop":
      continue
    if group is None:
      if options["missing"] == "drop":
        continue
      group = no_group
    lesion = (meta.get("lesion_id") or "").strip() or "image:" + row["image"]
    rows.append((row["image"], diagnosis, group, lesion, row.line))
  paths = [os.path.join(manual_dir, IMAGES, r[0] + ".jpg") for r in rows]
  keep = manual_files.find_missing_images(TITLE, paths, options["missing_images"],
                                          os.path.join(manual_dir, GROUND_TRUTH),
                                          [r[4] for r in rows])
  rows = [r for r, k in zip(rows, keep) if k]
  if options["label"] == "malignant":
    class_names = ("benign", "malignant")
    labels = [int(r[1] in MALIGNANT) for r in rows]
  else:
    class_names = tuple(c for c in CLASSES if any(r[1] == c for r in rows))
    labels = [class_names.index(r[1]) for r in rows]
  lesions = [r[3] for r in rows]
  return manual.labelled_table(
      paths, keep, lesions, labels, [r[2] for r in rows], options,
      class_names=list(class_names), group_names=list(_group_names(options)),
      images=[r[0] for r in rows], lesions=lesions)


load_isic2019 = manual.register_manual(
    "isic2019", table, title=TITLE, files=FILES, make_options=make_options,
    description="ISIC 2019 training images from a manual directory.")
