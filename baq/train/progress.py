"""Progress of a run: metrics.jsonl, a readable line, TensorBoard, the finite-loss check."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import jax
import numpy as np

from baq import launch
from baq import workdir as wd


# Progress-line order and short names; metrics.jsonl keeps the full names.
_FIRST = ("loss", "task_loss")
_LAST = ("avg_bits", "train_acc", "train_worst_group_acc", "val_acc",
         "val_worst_group_acc", "steps_per_s")
_SHORT = {"train_worst_group_acc": "train_worst", "val_worst_group_acc": "val_worst",
          "task_loss": "task", "steps_per_s": "it/s"}


def _order(key: str) -> tuple[int, int, str]:
  if key in _FIRST:
    return 0, _FIRST.index(key), key
  if key in _LAST:
    return 2, _LAST.index(key), key
  return 1, 0, key


class MetricWriter:
  """Metrics as JSON lines in WORKDIR/metrics.jsonl plus a readable line and,
  when `tensorboard` is set and tensorboardX is installed, TensorBoard events
  in WORKDIR/tensorboard/: every scalar, each group's accuracy
  (`train_group_acc/<g>`, `val_group_acc/<g>`) and the bit-width histogram.
  """

  def __init__(self, workdir: str, name: str, tensorboard: bool = False,
               group_names: Sequence[str] = ()):
    self.path, self.name = os.path.join(workdir, wd.METRICS_FILE), name
    self.group_names = list(group_names)
    self._tb = None
    if tensorboard and launch.is_primary():
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      except ImportError:
        print(f"[{name}] tensorboardX is not installed: no TensorBoard events", flush=True)
      else:
        self._tb = SummaryWriter(os.path.join(workdir, wd.TENSORBOARD_DIR))

  @property
  def wants_bits(self) -> bool:
    """Whether `write` uses the bit-widths (only for the histogram)."""
    return self._tb is not None

  def write(self, step: int, metrics: dict, bits: Optional[np.ndarray] = None) -> None:
    """One line of metrics; `bits` (every unit's bit-width) goes to the histogram."""
    if not launch.is_primary():  # one writer on several hosts
      return
    metrics = {k: (float(v) if np.ndim(v) == 0 else [None if x is None or np.isnan(x)
                                                     else float(x) for x in np.ravel(v)])
               for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=step, **metrics)) + "\n")
    shown = " ".join(f"{_SHORT.get(k, k)}={v:.4g}" for k, v in sorted(
        metrics.items(), key=lambda kv: _order(kv[0])) if isinstance(v, float))
    print(f"[{self.name}] step {step:5d} {shown}", flush=True)
    if self._tb is not None:
      self._events(step, metrics, bits)

  def _events(self, step: int, metrics: dict, bits: Optional[np.ndarray]) -> None:
    for k, v in metrics.items():
      if isinstance(v, float):
        self._tb.add_scalar(k, v, step)
      else:  # one value per group
        for g, x in enumerate(v):
          if x is not None:
            label = self.group_names[g] if g < len(self.group_names) else str(g)
            self._tb.add_scalar(f"{k}/{label}", x, step)
    if bits is not None and np.size(bits):
      self._tb.add_histogram("bits", np.asarray(bits, np.float64), step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def summarise(history: list[dict]) -> dict:
  """Means of the scalar metrics since the last line, with train (worst-group) accuracy."""
  stacked = jax.device_get(history)
  out = {k: float(np.mean([h[k] for h in stacked])) for k in stacked[0]
         if np.ndim(stacked[0][k]) == 0}
  correct = np.sum([h["group_correct"] for h in stacked], 0)
  count = np.sum([h["group_count"] for h in stacked], 0)
  acc = np.where(count > 0, correct / np.maximum(count, 1), np.nan)
  out["train_worst_group_acc"] = float(np.nanmin(acc))
  out["train_acc"] = float(correct.sum() / count.sum())
  out["train_group_acc"] = acc  # NaN for a group the steps did not sample
  return out


def check_finite(history: list[dict], workdir: str, last_saved: Optional[int]) -> None:
  """Stops the run on a non-finite loss, naming the last good checkpoint.

  Raises:
    FloatingPointError: a loss since the last check is NaN or infinite.
  """
  bad = [i for i, h in enumerate(jax.device_get([h["loss"] for h in history]))
         if not np.isfinite(h)]
  if bad:
    kept = (f"the last good checkpoint (step {last_saved}) is intact" if last_saved is not None
            else "no checkpoint had been written yet, so the run restarts from step 0")
    raise FloatingPointError(
        f"Non-finite loss in run {workdir} ({len(bad)} of the last {len(history)} "
        f"steps). Stopped; {kept}. Lower the learning rate or a penalty weight and resume.")
