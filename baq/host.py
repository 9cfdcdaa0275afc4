"""Host-side tuning that must happen before JAX starts its thread pools.

XLA:CPU allocates each execution's temporary buffer (about 96 MB for the main
job's train step) with malloc on its worker threads. glibc serves a block that
large from mmap: it is mapped, faulted in page by page as the kernels write
it (23,000 minor page faults a step) and unmapped again, so a quarter of the
main job's CPU time went to the kernel. `tune_allocator` makes glibc keep
such blocks: one arena for every thread (a thread arena cannot hold a block
over 64 MB), no mmap for large blocks, and no trimming of the heap's top.
The buffer is then reused from step to step. The numbers are unchanged
(only where memory comes from changes); the peak resident memory stays at
its high-water mark instead of falling between steps.

It is glibc's `mallopt`, so it acts on this process only and must run before
the first JAX computation (train.py, eval.py and the `python -m` entry points
call it first). `BAQ_MALLOC=0` leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def tune_allocator() -> bool:
  """Applies the settings above once; False where they do not apply (not
  glibc, or BAQ_MALLOC=0)."""
  global _applied
  if _applied:
    return True
  if os.environ.get("BAQ_MALLOC", "1") == "0":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  ok = all(mallopt(opt, value) == 1 for opt, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
  _applied = ok
  return ok
