"""Reading a manual directory: checks, CSV rows, images and leak-free splits.

The real-dataset modules (isic2019, fitzpatrick17k, celeba, folder) read the
user's files with these and hand a `manual.Table` to `manual.load_labelled`:

  * `require` checks the manual directory and names what is missing, where it
    should go and where it comes from; `choose` rejects unknown option values
    listing the valid ones; `read_csv` keeps each row's line in the file;
    `find_missing_images` applies the missing-image policy to absent and to
    unreadable (empty, corrupt, truncated) image files alike.
  * `load_image` decodes with PIL and resizes to `size` x `size` RGB uint8,
    raising `UnreadableImageError`, which names the file, on bad bytes.
  * `assign_splits` gives train/validation/test from a seed so that examples
    sharing a unit (a lesion, a patient) never sit in two splits, stratified
    by group (and by label within a group).
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import os
from typing import Any, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
# What PIL raises on bytes it cannot decode: UnidentifiedImageError (an
# OSError) for empty or foreign files, OSError for truncated ones,
# SyntaxError for broken PNG chunks, and ValueError or EOFError on others.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class UnreadableImageError(ValueError):
  """An image file is there but cannot be decoded (empty, corrupt, truncated).

  Attributes:
    path: the file (None for a message about several).
    reason: what the decoder said, e.g. 'OSError: image file is truncated'.
  """

  def __init__(self, message: str, path: str | None = None,
               reason: str | None = None):
    super().__init__(message)
    self.path, self.reason = path, reason


class Row(dict):
  """One CSV record, column -> text, with `line`: where it ends in the file.

  The header is line 1, so in a file without multi-line fields `line` is the
  row's line number as an editor shows it.
  """
  line: int = 0


def require(title: str, manual_dir: str | None, entries: dict,
            check_files: bool = True) -> str:
  """Checks that `manual_dir` holds every file or folder in `entries`.

  Args:
    title: dataset name used in messages, e.g. 'ISIC 2019'.
    manual_dir: the directory the config names.
    entries: relative path -> where to get it (a sentence).
    check_files: False checks only that a directory was named (prepared
      files are read without it).

  Returns:
    The absolute, user-expanded manual directory.

  Raises:
    ValueError: no `manual_dir` was given.
    FileNotFoundError: the directory or some entries are missing; the message
      names each missing entry, where it should go and where it comes from.
  """
  if not manual_dir:
    raise ValueError(
        f"{title}: pass manual_dir (dataset.kwargs.manual_dir), the folder "
        f"holding {', '.join(entries)}.")
  manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
  missing = [name for name in entries if check_files
             and not os.path.exists(os.path.join(manual_dir, name))]
  if missing:
    lines = [f"  {name}: {entries[name]}" for name in missing]
    raise FileNotFoundError(
        f"{title}: missing {', '.join(missing)} in {manual_dir}. Place them "
        "there (nothing is downloaded at run time):\n" + "\n".join(lines))
  return manual_dir


def choose(title: str, option: str, value: Any, valid: Sequence) -> Any:
  """Returns `value` if it is in `valid`, else raises listing the valid ones."""
  if value not in valid:
    raise ValueError(f"{title}: unknown {option} {value!r}; valid values: "
                     f"{', '.join(repr(v) for v in valid)}.")
  return value


def check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
  """Validates train/validation/test fractions: three, positive, sum 1."""
  fractions = tuple(float(f) for f in fractions)
  if (len(fractions) != 3 or min(fractions) <= 0
      or abs(sum(fractions) - 1) > 1e-6):
    raise ValueError(f"fractions must be three positive numbers (train, "
                     f"validation, test) summing to 1, got {fractions}.")
  return fractions


def read_csv(title: str, path: str, columns: Sequence[str]) -> list[Row]:
  """Reads a CSV into `Row`s, checking that it has `columns`.

  Args:
    title: dataset name for messages.
    path: the CSV file.
    columns: columns it must have.

  Returns:
    One `Row` (a dict with its `line`) per record.
  """
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    absent = [c for c in columns if c not in (reader.fieldnames or ())]
    if absent:
      raise ValueError(f"{title}: {path} lacks column(s) {', '.join(absent)}; "
                       f"it has {', '.join(reader.fieldnames or ())}.")
    rows = []
    for record in reader:
      rows.append(Row(record))
      rows[-1].line = reader.line_num
    return rows


def find_missing_images(title: str, paths: Sequence[str], policy: str,
                        source: str,
                        lines: Sequence[int] | None = None) -> np.ndarray:
  """Applies the missing-image policy ('error' or 'skip').

  A file counts as missing when it is absent or when it cannot be decoded
  (empty, corrupt or truncated bytes): every present file is decoded once,
  at a small draft size, so that a bad one is named here rather than deep
  inside preparation.

  Args:
    title: dataset name for messages.
    paths: the image files the table lists.
    policy: 'error' raises if any is absent or unreadable; 'skip' drops
      those rows.
    source: where the rows came from (a CSV path), for the message.
    lines: the line of `source` that lists each path, for the message.

  Returns:
    bool [n]: which rows to keep.

  Raises:
    FileNotFoundError: policy 'error' and some files are absent.
    UnreadableImageError: policy 'error' and some files cannot be decoded;
      the message names each (up to five) with its line in `source`.
  """
  choose(title, "missing_images", policy, ("error", "skip"))
  keep = np.array([os.path.isfile(p) for p in paths], bool)
  if policy == "error" and not keep.all():
    gone = [os.path.basename(p) for p, k in zip(paths, keep) if not k]
    raise FileNotFoundError(
        f"{title}: {len(gone)} of {len(paths)} images listed in {source} are "
        f"missing from {os.path.dirname(paths[0])} (e.g. "
        f"{', '.join(gone[:5])}). Add them, or pass missing_images='skip' to "
        "leave those rows out.")
  present = np.flatnonzero(keep)
  # PIL releases the GIL while decoding, so threads overlap the work.
  workers = min(4, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    reasons = list(pool.map(_decode_problem, [paths[i] for i in present]))
  bad = [(i, r) for i, r in zip(present, reasons) if r is not None]
  if policy == "error" and bad:
    where = [(f"line {lines[i]}: " if lines is not None else "")
             + f"{paths[i]} ({reason})" for i, reason in bad[:5]]
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    raise UnreadableImageError(
        f"{title}: {len(bad)} of {len(paths)} images listed in {source} cannot "
        f"be read: {'; '.join(where)}{more}. Replace them, or pass "
        "missing_images='skip' to leave those rows out.")
  keep[[i for i, _ in bad]] = False
  return keep


def _decode_problem(path: str) -> str | None:
  """Why `path` cannot be decoded, or None when it can."""
  try:
    stat = os.stat(path)
  except OSError as e:  # Gone or unreadable since the check for presence.
    return f"{type(e).__name__}: {e}"
  return _decode_problem_of(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1 << 18)
def _decode_problem_of(path: str, mtime_ns: int, size: int) -> str | None:
  """`_decode_problem`, once per version of a file (tables are re-read often)."""
  del mtime_ns, size  # Only the cache key: a rewritten file is decoded again.
  try:
    load_image(path, 8)  # JPEGs decode at 1/8 scale, yet read every byte.
  except UnreadableImageError as e:
    return e.reason
  return None


def load_image(path: str, size: int, center_crop: bool = False) -> np.ndarray:
  """Decodes an image with PIL into uint8 [size, size, 3] RGB.

  Args:
    path: image file (any format PIL reads).
    size: output height and width.
    center_crop: crop the central square first (keeps the aspect ratio);
      otherwise the whole image is resized, squashing non-square ones.

  Returns:
    The resized image.

  Raises:
    FileNotFoundError: `path` does not exist.
    UnreadableImageError: the file's bytes cannot be decoded; the message
      names the file.
  """
  from PIL import Image
  try:
    with Image.open(path) as img:
      # JPEGs decode at a reduced DCT scale when that still covers `size`:
      # several times faster on full-resolution photographs.
      img.draft("RGB", (size, size))
      img = img.convert("RGB")
      if center_crop and img.width != img.height:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
      if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
      return np.asarray(img, np.uint8)
  except FileNotFoundError:
    raise
  except _DECODE_ERRORS as e:
    reason = f"{type(e).__name__}: {e}"
    raise UnreadableImageError(f"cannot read image {path}: {reason}", path,
                               reason) from e


def assign_splits(units: Sequence, groups: np.ndarray, labels: np.ndarray,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  seed: int = 0) -> np.ndarray:
  """Seeded train/validation/test assignment that keeps units together.

  Every example of a unit (e.g. all images of one lesion) lands in the same
  split. Units are taken group by group; inside a group they are ordered by
  label, shuffled within a label, and dealt one by one to the split furthest
  below its share (j * fraction - count), so each group is split in the
  given fractions to within about one unit, and each label within a group to
  within about two. A group with at least three units gets at least one in
  every split.

  Args:
    units: [n] hashable unit of each example.
    groups: int [n] group of each example (a unit takes its first example's).
    labels: int [n] label of each example (likewise).
    fractions: (train, validation, test) shares of each group's units.
    seed: numpy seed of the shuffle.

  Returns:
    int8 [n] split of each example, an index into `SPLITS`.
  """
  fractions = np.asarray(check_fractions(fractions))
  unit_ids, first = {}, []
  example_unit = np.empty(len(units), np.int64)
  for i, unit in enumerate(units):
    if unit not in unit_ids:
      unit_ids[unit] = len(first)
      first.append(i)
    example_unit[i] = unit_ids[unit]
  first = np.asarray(first, np.int64)
  unit_group, unit_label = np.asarray(groups)[first], np.asarray(labels)[first]
  rng = np.random.default_rng(seed)
  tiebreak = rng.permutation(len(first))
  unit_split = np.empty(len(first), np.int8)
  for group in np.unique(unit_group):
    members = np.flatnonzero(unit_group == group)
    members = members[np.lexsort((tiebreak[members], unit_label[members]))]
    counts = np.zeros(3, np.int64)
    for j, unit in enumerate(members, start=1):
      k = int(np.argmax(j * fractions - counts))
      unit_split[unit], counts[k] = k, counts[k] + 1
    for k in np.flatnonzero(counts == 0) if len(members) >= 3 else ():
      donor = int(np.argmax(counts))  # Move the donor's last unit over.
      unit = members[unit_split[members] == donor][-1]
      unit_split[unit], counts[k], counts[donor] = k, 1, counts[donor] - 1
  return unit_split[example_unit]
