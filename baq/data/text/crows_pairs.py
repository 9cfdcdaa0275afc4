"""Loads CrowS-Pairs (crows_pairs_anonymized.csv) as arrays.

The file (Nangia et al. 2020, github.com/nyu-mll/crows-pairs, data/) has an
unnamed index column, then sent_more, sent_less, stereo_antistereo,
bias_type, annotations, anon_writer, anon_annotators. Sentences contain
quoted commas, so it is read with the `csv` module. In every row sent_more is
the more stereotypical sentence; stereo_antistereo says which of the two was
written about the historically disadvantaged group: "stereo" when sent_more
is (it demonstrates a stereotype), "antistereo" when sent_less is (it violates
one). The official metric (metric.py) counts a pair for the model when it
scores sent_more above sent_less in both directions; see
`baq.fairness.stereotype.crows_pairs_score`. Only the four columns that the
metric uses are required.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

REQUIRED_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
DIRECTIONS = ("stereo", "antistereo")


@dataclasses.dataclass
class CrowsPairs:
  """CrowS-Pairs rows as parallel arrays (one entry per pair)."""
  sent_more: np.ndarray    # str [n], the more stereotypical sentence
  sent_less: np.ndarray    # str [n]
  direction: np.ndarray    # str [n], "stereo" or "antistereo"
  bias_type: np.ndarray    # str [n]
  bias_types: list         # sorted distinct bias types of the loaded rows
  index: np.ndarray        # str [n], the file's unnamed index column ("" if absent)

  def __len__(self) -> int:
    return len(self.sent_more)


def _read_rows(path: str) -> tuple[list, list]:
  """(header, rows as dicts) of a CSV file, checking the required columns."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"CrowS-Pairs file not found: {path}")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    header = list(reader.fieldnames or [])
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
      raise ValueError(f"{path} lacks the column(s) {', '.join(missing)} "
                       f"(it has: {', '.join(repr(h) for h in header)}).")
    return header, list(reader)


def load_crows_pairs(path: str, *, bias_types: Optional[Sequence[str]] = None) -> CrowsPairs:
  """Reads crows_pairs_anonymized.csv.

  Args:
    path: the CSV file.
    bias_types: keep only these bias types (None: all).

  Returns:
    A `CrowsPairs`, rows in file order.

  Raises:
    FileNotFoundError: the file is missing (the message names it).
    ValueError: required columns are missing (listed by name); a row's
      stereo_antistereo is neither "stereo" nor "antistereo" (the message
      names the row and the value); a requested bias type is not in the file
      (the message lists the valid ones).
  """
  header, rows = _read_rows(path)
  index_col = header[0] if header and header[0] not in REQUIRED_COLUMNS else None
  for line, row in enumerate(rows, start=2):  # line 1 is the header
    if row["stereo_antistereo"] not in DIRECTIONS:
      name = f" (index {row[index_col]})" if index_col is not None else ""
      raise ValueError(f"{path}: row at line {line}{name} has stereo_antistereo "
                       f"{row['stereo_antistereo']!r}; expected one of {', '.join(DIRECTIONS)}.")
  present = sorted({row["bias_type"] for row in rows})
  if bias_types is not None:
    unknown = [b for b in bias_types if b not in present]
    if unknown:
      raise ValueError(f"Unknown bias type(s) {', '.join(map(repr, unknown))}. "
                       f"Valid: {', '.join(present)}.")
    keep = set(bias_types)
    rows = [row for row in rows if row["bias_type"] in keep]

  def col(name):
    # The real index column's name is "", so test for None, not falsiness.
    return np.array([row[name] if name is not None else "" for row in rows], dtype=str)

  return CrowsPairs(sent_more=col("sent_more"), sent_less=col("sent_less"),
                    direction=col("stereo_antistereo"), bias_type=col("bias_type"),
                    bias_types=sorted({row["bias_type"] for row in rows}),
                    index=col(index_col))
