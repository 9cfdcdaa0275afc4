"""Independent runs trained side by side: lanes of thunks in threads.

After the float model, the main job's fine-tuning runs (the uniform
baselines; the methods, with the allocation some of them start from) depend
on nothing but the float weights. On a CPU one XLA train step keeps about
1.5 of 2 cores busy (its serial parts leave the rest idle), so two runs in
threads of one process fill more of them: in the main job two steps at once
ran at about 1.2x the throughput of one (docs/performance.md). Each XLA
computation's arithmetic depends on its program and the machine's thread
count, not on what runs beside it, so the results are bit for bit those of
the runs in order (tested).

Threads, not processes: the data, the compiled programs and the float
weights are shared, and nothing is imported twice. The lanes are daemon
threads, so an interrupted job stops at once; every run resumes exactly
from its checkpoints. With several processes (multi-host) every host must
issue the same collectives in the same order, so the lanes then run in
order.

`config.concurrent_runs` is "auto" by default (`concurrency`): two lanes on
a CPU backend, where they fill idle cores, and one elsewhere. On an
accelerator two runs would contend for the same device and hold two train
states; with several local devices in one process, two lanes would launch
two SPMD programs over the same devices at once, so that is refused.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import jax

Lane = Sequence[Callable[[], object]]
AUTO = "auto"


def concurrency(setting: object) -> int:
  """The number of lanes `config.concurrent_runs` asks for, on this process.

  Args:
    setting: "auto", or a positive integer (or its digits, as the command
      line gives them).

  Returns:
    "auto": 2 on a CPU backend with one local device, else 1. An integer:
    itself, except 1 when there are several processes (every host must
    issue the same collectives in the same order).

  Raises:
    ValueError: not "auto" nor an integer >= 1; or more than one lane while
      this process drives several local devices.
  """
  text = str(setting).strip()
  if text != AUTO and not (text.isdigit() and int(text) >= 1):
    raise ValueError(f"concurrent_runs={setting!r} must be {AUTO!r} or an integer >= 1.")
  local = jax.local_device_count()
  if text == AUTO:
    n = 2 if jax.default_backend() == "cpu" and local == 1 else 1
  else:
    n = int(text)
  if n > 1 and local > 1:
    raise ValueError(f"concurrent_runs={setting!r}: this process drives {local} local devices, "
                     "and lanes at once would launch two SPMD programs over them; use 1 or "
                     f"{AUTO!r}.")
  return 1 if jax.process_count() > 1 else n


def run_lanes(lanes: Sequence[Lane], concurrent: int) -> None:
  """Runs each lane's thunks in order, up to `concurrent` lanes at once.

  Args:
    lanes: lists of zero-argument callables; a lane's thunks run in order.
    concurrent: lanes run at once (1: every lane in order, in this thread).
      More than one process always runs them in order.

  Raises:
    ValueError: concurrent < 1.
    The first exception a lane raised, once every started lane has stopped.
  """
  if concurrent < 1:
    raise ValueError(f"concurrent={concurrent} must be >= 1.")
  lanes = [list(lane) for lane in lanes if lane]
  if concurrent == 1 or len(lanes) <= 1 or jax.process_count() > 1:
    for lane in lanes:
      for thunk in lane:
        thunk()
    return
  errors: list[BaseException] = []
  pending = list(reversed(lanes))
  lock = threading.Lock()

  def worker():
    while True:
      with lock:
        if errors or not pending:
          return
        lane = pending.pop()
      try:
        for thunk in lane:
          thunk()
      except BaseException as e:  # pylint: disable=broad-except
        with lock:
          errors.append(e)
        return

  threads = [threading.Thread(target=worker, daemon=True)
             for _ in range(min(concurrent, len(lanes)))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
