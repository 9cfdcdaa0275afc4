"""Refusing a config that cannot run, before anything trains; loading a workdir's config.

Every name is checked against its registry (an unknown one lists the valid
ones), and every bound is checked with the bound it breaks named.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from typing import Optional

import ml_collections
import numpy as np

from baq.allocation import importance, planner
from baq.data import datasets
from baq.data.pipeline import recipe
from baq.fairness import regularizers
from baq.models import COMPUTE_DTYPES, DEFAULT_DTYPE, MODELS
from baq.quant import methods, units
from baq.train import modes, rounding
from baq.experiment import lanes, runtime_baselines
from baq import workdir as wd
from baq.experiment.deploy import export_formats as deploy_formats
from baq.train.loop import group_loss_weights


def import_extensions(config: ml_collections.ConfigDict) -> None:
  """Imports `config.imports` (comma-separated modules) for their registrations.

  A researcher's own regularizers, models, modes, parametrizations or
  datasets live in their own module, registered with the decorators of baq's
  registries; naming the module here makes them selectable by name, with no
  change to baq.
  """
  for name in filter(None, (s.strip() for s in config.get("imports", "").split(","))):
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise ImportError(f"config.imports names {name!r}, which cannot be imported: {e}. "
                        "Is its directory on PYTHONPATH?") from e


def _check_importance(config: ml_collections.ConfigDict) -> None:
  ic = config.importance
  importance.MEASURES.get(ic.measure)
  importance.REDUCERS.get(ic.reducer)
  bad = [c for c in ic.choices if not config.quant.min_bits <= c <= config.quant.max_bits]
  if bad:
    raise ValueError(f"importance.choices {list(ic.choices)} has {bad} outside "
                     f"[min_bits, max_bits] = [{config.quant.min_bits}, {config.quant.max_bits}].")
  if ic.method not in planner.METHODS:
    raise ValueError(f"Unknown importance.method {ic.method!r}. "
                     f"Valid: {', '.join(planner.METHODS)}.")


def at_least(config: ml_collections.ConfigDict, bounds: dict) -> None:
  """Each dotted field an integer >= its bound (absent fields are skipped).

  Args:
    config: any config.
    bounds: dotted field -> the least integer it may hold.

  Raises:
    ValueError: naming the field, its value and the bound.
  """
  for dotted, least in bounds.items():
    node = config
    for key in dotted.split("."):
      node = node.get(key) if hasattr(node, "get") else None
    if node is not None and not (isinstance(node, int) and not isinstance(node, bool)
                                 and node >= least):
      raise ValueError(f"{dotted}={node!r} must be an integer >= {least}.")


def _check_uniform(config: ml_collections.ConfigDict) -> None:
  """Each uniform<B> baseline's B within what uniform QAT can hold, before any work."""
  lowest = 2 if config.quant.get("symmetric", True) else 1
  for b in wd.baseline_bits(config):
    try:
      methods.parse(f"qat@{b}")  # the registry's bounds
    except ValueError as e:
      raise ValueError(f"Baseline uniform{b}: {e} Valid: uniform{lowest} .. uniform16.") from None
    if b < lowest:
      raise ValueError(f"Baseline uniform{b}: a symmetric grid needs at least {lowest} bits. "
                       f"Valid: uniform{lowest} .. uniform16.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses a config that cannot run, before anything is trained.

  Raises:
    KeyError: an unknown registered name (the message lists the valid ones).
    ValueError: an impossible value (the message names the bound it breaks).
  """
  import_extensions(config)
  selected = modes.selected(config)
  specs = [modes.get_mode(config, m) for m in selected]
  MODELS.get(config.model.name)
  COMPUTE_DTYPES.get(config.model.get("dtype", DEFAULT_DTYPE))
  datasets.DATASETS.get(config.dataset.name)
  for name, entry in config.penalties.to_dict().items():
    regularizers.REGULARIZERS.get(dict(entry).get("kind", name))
  wd.baseline_names(config)  # uniform<B> or a runtime's numerics; others list the valid ones
  _check_uniform(config)
  runtime_baselines.check(config)
  at_least(config, {"steps": 0, "float_steps": 1, "batch_size": 1, "eval_batch_size": 1,
                    "log_every": 1, "eval_every": 1, "checkpoint_every": 1})
  if any(s.uses_budget for s in specs) and config.quant.target_bytes is None:
    try:
      units.check_budget(float(config.quant.target_bits), config.quant.min_bits,
                         config.quant.max_bits)
    except ValueError as e:
      raise ValueError(f"Impossible budget target_bits={config.quant.target_bits}: {e}") from None
  if "importance" in config:
    _check_importance(config)
  elif any(s.init_allocation for s in specs):
    raise ValueError("These modes allocate bits by importance: the config needs an "
                     "`importance` section (see configs/default.py).")
  group_loss_weights(config.get("group_weighting", "none"), np.zeros(1, np.int64), 1)
  rounding.check(config)
  deploy_formats(config.get("export", "safetensors"))
  recipe(config.dataset)  # unknown options and impossible ranges
  crop = config.dataset.get("eval_center_crop")
  if crop is not None and not 0 < crop <= 1:
    raise ValueError(f"dataset.eval_center_crop={crop} must lie in (0, 1].")
  search = config.quant.get("search_steps")
  if search is not None and not (isinstance(search, int) and search >= 1):
    raise ValueError(f"quant.search_steps={search} must be None or a positive integer.")
  lanes.concurrency(config.get("concurrent_runs", lanes.AUTO))
  for field in ("lr", "finetune_lr"):
    lr = config.optim.get(field)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
      raise ValueError(f"optim.{field}={lr} must be a positive finite learning rate.")


def _tuples(tree):
  """JSON lists back to the tuples a config holds (hashable model options)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def load_config(workdir: str, config: Optional[ml_collections.ConfigDict] = None
                ) -> ml_collections.ConfigDict:
  """`config`, or the one WORKDIR/config.json was trained with; validated.

  Raises:
    FileNotFoundError: no config given and the workdir has no config.json.
  """
  if config is None:
    path = wd.path(workdir, wd.CONFIG_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} not found: is {workdir} a train.py workdir? "
                              "Pass --config to evaluate with an explicit config.")
    with open(path) as f:
      config = ml_collections.ConfigDict(_tuples(json.load(f)))
  validate(config)
  return config
