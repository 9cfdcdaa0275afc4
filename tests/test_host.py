"""The allocator tuning: XLA's per-execution buffers stop faulting pages in every call."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

_CHILD = r"""
import json, resource
from baq import host
applied = host.tune_allocator()
import jax, jax.numpy as jnp
@jax.jit
def f(x):  # a temporary of 128 MB, bigger than a glibc thread arena can hold
  y = jnp.tanh(x[None] * jnp.arange(32.0)[:, None, None])
  return y.sum(0)
x = jnp.ones((1024, 1024))
f(x).block_until_ready()
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  f(x).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps(dict(applied=applied, faults=after - before)))
"""


def _faults(env):
  out = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, **env), timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_reuses_large_buffers_instead_of_faulting_them_in():
  plain, tuned = _faults({"BAQ_MALLOC": "0"}), _faults({"BAQ_MALLOC": "1"})
  assert not _faults({})["applied"]  # opt-in: off by default
  assert not plain["applied"] and tuned["applied"]
  # Untuned, each call maps and faults its 128 MB temporary (32,768 pages);
  # tuned, the heap keeps it.
  assert plain["faults"] > 10 * 20000
  assert tuned["faults"] < plain["faults"] / 20, (plain, tuned)
