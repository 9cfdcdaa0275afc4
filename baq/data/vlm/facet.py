"""Loads FACET (annotations.csv, imgs_1..3) lazily, and decodes person crops.

FACET (Gustafson et al., ICCV 2023, facet.metademolab.com) has one row per
annotated person in annotations.csv: person_id, filename (an image in one of
the folders imgs_1, imgs_2, imgs_3 of the download), class1 (the person's
class, e.g. 'guitarist'; class2 is an optional second one), bounding_box (a
JSON object {"x", "y", "width", "height"} in pixels) and the perceived
attributes, each spread over per-value columns that count the annotators who
chose the value:

  gender_presentation_masc / _fem / _non_binary / _na
  age_presentation_young / _middle / _older / _na
  skin_tone_1 .. skin_tone_10 (Monk Skin Tone scale, MST 1 = lightest) and
  skin_tone_na; annotators may choose several tones for one person

Groups here (one per person, for disjoint group metrics):
  gender, age: the value with the most votes; no votes, a tie for the most,
    or '_na' holding the most give the 'na' group.
  skin_tone: the vote-weighted mean MST of the chosen tones, binned as
    lighter (mean < 3.5, i.e. MST 1-3), middle (3.5 <= mean < 6.5, MST 4-6)
    and darker (mean >= 6.5, MST 7-10); a person with no tone chosen (only
    skin_tone_na, or nothing) is 'na'. A vote split evenly between MST 3 and
    4 lands in middle. `Facet.skin_tone_votes` keeps the raw counts for
    other binnings.
The 'na' group is always the last code of an attribute; drop it (codes !=
len(names) - 1) before group metrics if unknowns should not form a group.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import math
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from baq.data.manual import files

TITLE = "FACET"
ANNOTATIONS = "annotations.csv"
IMAGE_DIRS = ("imgs_1", "imgs_2", "imgs_3")
GENDER_GROUPS = ("masc", "fem", "non_binary", "na")
AGE_GROUPS = ("young", "middle", "older", "na")
SKIN_GROUPS = ("lighter", "middle", "darker", "na")
SKIN_EDGES = (3.5, 6.5)  # vote-weighted mean MST: lighter | middle | darker
TONE_COLUMNS = tuple(f"skin_tone_{i}" for i in range(1, 11))
_GENDER_COLUMNS = tuple(f"gender_presentation_{g}" for g in GENDER_GROUPS)
_AGE_COLUMNS = tuple(f"age_presentation_{g}" for g in AGE_GROUPS)
REQUIRED_COLUMNS = (("person_id", "filename", "class1", "bounding_box")
                    + _GENDER_COLUMNS + TONE_COLUMNS + ("skin_tone_na",)
                    + _AGE_COLUMNS)


class Facet(NamedTuple):
  """FACET persons as parallel arrays (one entry per person, file order)."""
  paths: list             # str [n] image file of each person
  boxes: np.ndarray       # float32 [n, 4] person box (x, y, width, height), pixels
  classes: list           # str [n] class1 of each person
  attributes: dict        # 'gender', 'skin_tone', 'age' -> int32 [n] group codes
  names: dict             # the same keys -> list of group names (code order)
  labels: np.ndarray      # int32 [n] index of each person's class in class_names
  class_names: list       # sorted distinct class1 values
  person_ids: list        # str [n]
  skin_tone_votes: np.ndarray  # int32 [n, 10] annotator counts of MST 1..10


def _number(row: files.Row, column: str, path: str) -> float:
  text = (row[column] or "0").strip() or "0"
  try:
    return float(text)
  except ValueError:
    raise ValueError(f"{TITLE}: {path} line {row.line}: column {column} holds "
                     f"{text!r}, not a count.") from None


def _box(row: files.Row, path: str) -> list:
  """(x, y, width, height) from the bounding_box JSON (or Python dict) text."""
  text = row["bounding_box"]
  try:
    try:
      box = json.loads(text)
    except json.JSONDecodeError:
      box = ast.literal_eval(text)
    return [float(box[key]) for key in ("x", "y", "width", "height")]
  except (ValueError, SyntaxError, KeyError, TypeError) as e:
    raise ValueError(f"{TITLE}: {path} line {row.line} (person "
                     f"{row['person_id']}): bounding_box {text!r} is not an "
                     f"object with x, y, width, height ({e}).") from None


def _most_votes(votes: np.ndarray) -> np.ndarray:
  """Code of each row's unique largest column; ties or no votes -> last (na)."""
  top = votes.max(axis=1)
  tied = (votes == top[:, None]).sum(axis=1) > 1
  return np.where((top > 0) & ~tied, votes.argmax(axis=1),
                  votes.shape[1] - 1).astype(np.int32)


def _skin_bins(tones: np.ndarray) -> np.ndarray:
  """lighter / middle / darker by the vote-weighted mean MST; na without votes."""
  total = tones.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = tones @ np.arange(1, 11) / total
  return np.where(total > 0, np.digitize(mean, SKIN_EDGES),
                  len(SKIN_GROUPS) - 1).astype(np.int32)


def _image_index(root: str, image_dirs: Sequence[str]) -> dict:
  """File name -> path over the image folders (the first folder wins)."""
  present = [d for d in image_dirs if os.path.isdir(os.path.join(root, d))]
  if not present:
    raise FileNotFoundError(
        f"{TITLE}: none of the image folders {', '.join(image_dirs)} is in "
        f"{root}. Unzip FACET's image archives there (from "
        "facet.metademolab.com; nothing is downloaded at run time).")
  index = {}
  for d in present:
    for name in sorted(os.listdir(os.path.join(root, d))):
      index.setdefault(name, os.path.join(root, d, name))
  return index


def load_facet(root: str, missing_images: str = "error",
               image_dirs: Sequence[str] = IMAGE_DIRS) -> Facet:
  """Reads FACET's annotations.csv and finds every person's image.

  Args:
    root: the folder holding annotations.csv and the image folders.
    missing_images: 'error' raises when a listed image is in no image
      folder; 'skip' leaves those persons out. Images are not decoded here.
    image_dirs: the image folders under `root`, searched in order.

  Returns:
    A `Facet` (see the module docstring for the groups).

  Raises:
    FileNotFoundError: annotations.csv or every image folder is missing, or
      (policy 'error') images are missing: the message names each (up to
      five) with its line in the CSV and its person_id.
    ValueError: required columns are missing (listed by name), or a count or
      a bounding_box cannot be parsed (the message names the line).
  """
  files.choose(TITLE, "missing_images", missing_images, ("error", "skip"))
  root = files.require(TITLE, root, {
      ANNOTATIONS: "FACET's annotation file (facet.metademolab.com)"})
  path = os.path.join(root, ANNOTATIONS)
  rows = files.read_csv(TITLE, path, REQUIRED_COLUMNS)
  index = _image_index(root, image_dirs)
  missing = [r for r in rows if r["filename"] not in index]
  if missing and missing_images == "error":
    where = [f"line {r.line}: {r['filename']} (person {r['person_id']})"
             for r in missing[:5]]
    more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise FileNotFoundError(
        f"{TITLE}: {len(missing)} of {len(rows)} images listed in {path} are "
        f"in none of {', '.join(image_dirs)} under {root}: {'; '.join(where)}"
        f"{more}. Add them, or pass missing_images='skip'.")
  rows = [r for r in rows if r["filename"] in index]
  count = lambda cols: np.array([[_number(r, c, path) for c in cols]
                                 for r in rows], np.float64).reshape(-1, len(cols))
  tones = count(TONE_COLUMNS)
  classes = [r["class1"] for r in rows]
  class_names = sorted(set(classes))
  lookup = {c: i for i, c in enumerate(class_names)}
  return Facet(
      paths=[index[r["filename"]] for r in rows],
      boxes=np.array([_box(r, path) for r in rows], np.float32).reshape(-1, 4),
      classes=classes,
      attributes={"gender": _most_votes(count(_GENDER_COLUMNS)),
                  "skin_tone": _skin_bins(tones),
                  "age": _most_votes(count(_AGE_COLUMNS))},
      names={"gender": list(GENDER_GROUPS), "skin_tone": list(SKIN_GROUPS),
             "age": list(AGE_GROUPS)},
      labels=np.array([lookup[c] for c in classes], np.int32),
      class_names=class_names,
      person_ids=[r["person_id"] for r in rows],
      skin_tone_votes=tones.astype(np.int32))


def _crop(path: str, size: int, box) -> np.ndarray:
  """Decodes `path`, crops `box` (x, y, w, h; clipped to the image), resizes."""
  from PIL import Image
  x, y, w, h = (float(v) for v in box)
  try:
    with Image.open(path) as img:
      full_w, full_h = img.size
      left, top = max(0.0, x), max(0.0, y)
      right, bottom = min(float(full_w), x + w), min(float(full_h), y + h)
      if right - left >= 1 and bottom - top >= 1:
        # JPEGs decode at a reduced DCT scale while the crop still covers size.
        scale = size / min(right - left, bottom - top)
        if scale < 1:
          img.draft("RGB", (math.ceil(full_w * scale), math.ceil(full_h * scale)))
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        rect = (round(left * sx), round(top * sy), max(round(right * sx), round(left * sx) + 1),
                max(round(bottom * sy), round(top * sy) + 1))
        img = img.convert("RGB").crop(rect).resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(img, np.uint8)
  except FileNotFoundError:
    raise
  except files._DECODE_ERRORS as e:  # One list of PIL's decode errors, in files.
    reason = f"{type(e).__name__}: {e}"
    raise files.UnreadableImageError(f"cannot read image {path}: {reason}", path,
                                     reason) from e
  raise ValueError(f"box (x={x}, y={y}, width={w}, height={h}) of {path} lies "
                   f"outside the {full_w}x{full_h} image.")


def read_images(paths: Sequence[str], size: int, boxes: Optional[np.ndarray] = None,
                workers: int = 4) -> np.ndarray:
  """Decodes images (PIL) into uint8 [n, size, size, 3] RGB.

  Without boxes the whole image is resized (squashed if not square; FairFace
  images are square). With boxes each image is first cropped to its person's
  box, as zero-shot person classification on FACET does, then resized.

  Args:
    paths: n image files (e.g. `load_fairface(...).paths`).
    size: output height and width.
    boxes: optional float [n, 4] (x, y, width, height) in pixels of the
      original image (e.g. `load_facet(...).boxes`); clipped to the image.
    workers: decoding threads (PIL releases the GIL while decoding).

  Returns:
    The images, in the order of `paths`.

  Raises:
    FileNotFoundError: a file is missing (named).
    baq.data.manual.files.UnreadableImageError: a file cannot be decoded
      (named, with the decoder's reason).
    ValueError: a box lies outside its image (file and box named).
  """
  if boxes is not None and len(boxes) != len(paths):
    raise ValueError(f"{len(boxes)} boxes for {len(paths)} paths.")
  one = (lambda i: files.load_image(paths[i], size)) if boxes is None else (
      lambda i: _crop(paths[i], size, boxes[i]))
  out = np.empty((len(paths), size, size, 3), np.uint8)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for i, image in enumerate(pool.map(one, range(len(paths)))):
      out[i] = image
  return out
