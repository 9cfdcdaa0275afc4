"""Progress lines of the long drivers: one line per finished unit, with an estimate.

The studies, the seed sweep and the Pareto benchmark run for minutes to
hours; each prints, per setting or run, one line such as

  [lm] seed 0: setting 3 of 20 (gptq@4) done in 6.1 s; 41 s elapsed, about 1.9 min left

flushed at once, by process 0 only (the others compute the same and stay
quiet). The estimate is the mean time of the units computed so far times
the units left; a unit reused from an earlier run (a resumed workdir) is
reported but does not count towards the mean, since its seconds say nothing
about the work still to do.

  p = progress.Progress("lm", total=len(names), unit="setting", prefix="seed 0")
  p.note("model loaded")            # set-up steps: "[lm] seed 0: model loaded; 3 s elapsed"
  for name in names:
    ...
    p.done(name)                    # or p.done(name, reused=True)
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence


def estimate_left(durations: Sequence[float], left: int) -> Optional[float]:
  """Seconds still to go: the mean of `durations` times `left`; None with nothing measured.

  Args:
    durations: seconds of each unit computed so far (reused units left out).
    left: units not yet done.

  Returns:
    The estimate, 0.0 when nothing is left, None when no unit has been timed.
  """
  if left <= 0:
    return 0.0
  if not durations:
    return None
  return float(sum(durations)) / len(durations) * left


def format_seconds(seconds: float) -> str:
  """"41 s" under 90 s, "1.9 min" under 90 minutes, "2.3 h" above."""
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 90 * 60:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def _primary() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == 0


class Progress:
  """Counts the units of one loop and prints a line as each finishes.

  Args:
    tag: the driver's short name, printed in brackets ("lm", "vlm", "sweep").
    total: units in the loop (> 0).
    unit: what a unit is called ("setting", "quantizer", "run").
    prefix: what the loop belongs to ("seed 0"), or "".
    printer: where lines go (`print` with flush=True; tests pass a list's append).
    clock: seconds, monotonic (tests pass a fake).
    primary: whether this process prints; None asks jax (process 0 prints).
  """

  def __init__(self, tag: str, total: int, *, unit: str = "setting", prefix: str = "",
               printer: Optional[Callable[[str], None]] = None,
               clock: Callable[[], float] = time.monotonic, primary: Optional[bool] = None):
    if total < 1:
      raise ValueError(f"Progress total={total} must be >= 1.")
    self.tag, self.total, self.unit, self.prefix = tag, int(total), unit, prefix
    self._print = printer or (lambda s: print(s, flush=True))
    self._clock = clock
    self._primary = primary
    self.start = self._last = clock()
    self.index = 0
    self.durations: list[float] = []

  def _head(self) -> str:
    return f"[{self.tag}] {self.prefix}: " if self.prefix else f"[{self.tag}] "

  def _emit(self, text: str) -> None:
    primary = _primary() if self._primary is None else self._primary
    if primary:
      self._print(text)

  def mark(self) -> None:
    """Starts the clock of the next unit here (set-up work before it is not its time)."""
    self._last = self._clock()

  def note(self, what: str) -> str:
    """Prints a set-up step ("model loaded") with the time elapsed; returns the line."""
    now = self._clock()
    text = f"{self._head()}{what}; {format_seconds(now - self.start)} elapsed"
    self._last = now
    self._emit(text)
    return text

  def done(self, label: str, *, reused: bool = False, extra: str = "") -> str:
    """Records one finished unit and prints its line; returns the line.

    Args:
      label: the unit's name ("gptq@4").
      reused: it was read from an earlier run, not computed (left out of the mean).
      extra: appended after the estimate (a unit's headline figures).
    """
    now = self._clock()
    took, self._last = now - self._last, now
    self.index += 1
    if not reused:
      self.durations.append(took)
    how = "reused" if reused else f"done in {took:.1f} s"
    text = (f"{self._head()}{self.unit} {self.index} of {self.total} ({label}) {how}; "
            f"{format_seconds(now - self.start)} elapsed")
    left = estimate_left(self.durations, self.total - self.index)
    if left is not None and self.index < self.total:
      text += f", about {format_seconds(left)} left"
    if extra:
      text += f". {extra}"
    self._emit(text)
    return text
