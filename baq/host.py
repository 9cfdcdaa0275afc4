"""Host-side allocator tuning, opt-in, before JAX starts its thread pools.

XLA:CPU allocates each execution's temporary buffer with malloc on its
worker threads. glibc serves a block over 32 MB from mmap: it is mapped,
faulted in page by page as the kernels write it and unmapped again. When
nn.max_pool's select-and-scatter gradient gave the main job's train step a
96 MB temporary, that was 23,000 minor page faults a step and a quarter of
its CPU time in the kernel. `tune_allocator` makes glibc keep such blocks:
one arena for every thread (a thread arena cannot hold a block over 64 MB),
no mmap for large blocks and no trimming of the heap's top, so the buffer
is reused from step to step (tests/test_host.py: a 128 MB temporary).

It is off unless `BAQ_MALLOC=1`. Once `layers.max_pool` removed that
temporary, the main job (2026-12-01, `/usr/bin/time -v`) took 153 s wall,
243 s user and 6.4 s system with glibc's defaults and 187 s, 275 s and
12.3 s with this tuning: the single arena's lock cost more than the faults
it saves. Settings that keep the threads' arenas (no mmap and no trim only)
do not keep the 128 MB block. Turn it on for a step whose temporaries are
larger than 64 MB (a large model trained on CPU) and measure. The numbers
are unchanged either way (only where memory comes from changes).

It is glibc's `mallopt`, so it acts on this process only and must run before
the first JAX computation (train.py, eval.py and the `python -m` entry points
call it first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def tune_allocator() -> bool:
  """Applies the settings above once when BAQ_MALLOC=1; False where they do
  not apply (not asked for, or not glibc)."""
  global _applied
  if _applied:
    return True
  if os.environ.get("BAQ_MALLOC", "0") != "1":
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
