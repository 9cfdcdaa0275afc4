"""Which config a study root can resume with: the config as the cells depend on it.

A bias study's root keeps the config it was made with (config.json); a
later run may change what changes no cell's predictions (`NOT_IN_CELLS`:
the study options, the seeds, logging and evaluation batch sizes, the data
directory) and nothing else (`cell_config`, `conflicts`).
"""

from __future__ import annotations

import json
import os
from typing import Any

# Fields that change no cell's predictions: they may differ when a study resumes.
NOT_IN_CELLS = ("study", "seeds", "diagnostics", "imports", "log_every", "eval_every",
                "checkpoint_every", "eval_batch_size")


def cell_config(config: Any) -> dict:
  """What the cells depend on, as JSON: the config less NOT_IN_CELLS and data_dir.

  A manual directory is compared as a real path, so "../shared/x" given to
  train.py and "/work/shared/x" given to the study are the same data.

  Args:
    config: a ConfigDict, or its JSON dict (a workdir's config.json).

  Returns:
    The JSON dict the cells depend on.
  """
  c = config if isinstance(config, dict) else json.loads(config.to_json())
  c = {k: v for k, v in c.items() if k not in NOT_IN_CELLS}
  c["dataset"] = {k: v for k, v in c["dataset"].items() if k != "data_dir"}
  kwargs = c["dataset"].get("kwargs")
  if isinstance(kwargs, dict) and isinstance(kwargs.get("manual_dir"), str):
    c["dataset"]["kwargs"] = dict(kwargs, manual_dir=os.path.realpath(kwargs["manual_dir"]))
  return c


def conflicts(old: dict, new: dict, prefix: str = "") -> list[str]:
  """Dotted fields both configs hold with different values.

  A field only one of them holds is newer code, not a different experiment.

  Args:
    old: one config's JSON dict (`cell_config`).
    new: the other's.
    prefix: the dotted path of these dicts (for recursion).

  Returns:
    The differing fields, sorted.
  """
  out = []
  for k in sorted(set(old) & set(new)):
    a, b = old[k], new[k]
    if isinstance(a, dict) and isinstance(b, dict):
      out += conflicts(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(prefix + k)
  return out
