"""Exports are byte-reproducible: a safetensors file's bytes follow from its content.

safetensors orders its JSON header from a Rust hash map, differently in each
process and each map; `baq.export.canonical` rewrites the header sorted.
Saved five times (and once in another process), the bytes are identical;
safetensors' own reader loads the file with the same tensors and metadata.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np

from baq.export import canonical
from conftest import ROOT

ARRAYS = {"b::codes": np.arange(11, dtype=np.uint8),
          "a::scale": np.linspace(0, 1, 5, dtype=np.float32),
          "c::zero_point": np.zeros((2, 3), np.float32)}
META = {k: str(i) for i, k in enumerate("hgfedcba")}

_SAVE = ("import sys; sys.path[:0] = [sys.argv[2], sys.argv[3]]; "
         "from baq.export import canonical; import test_canonical_safetensors as t; "
         "canonical.save_file(t.ARRAYS, sys.argv[1], t.META)")


def _digest(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_the_same_content_gives_the_same_bytes(tmp_path):
  paths = [str(tmp_path / f"{i}.safetensors") for i in range(5)]
  for p in paths:
    canonical.save_file(ARRAYS, p, META)
  other = str(tmp_path / "other_process.safetensors")
  subprocess.run([sys.executable, "-c", _SAVE, other, ROOT, os.path.join(ROOT, "tests")],
                 cwd=ROOT, check=True)
  assert len({_digest(p) for p in paths + [other]}) == 1
  with open(paths[0], "rb") as f:
    blob = f.read()
  (n,) = struct.unpack("<Q", blob[:8])
  header = json.loads(blob[8:8 + n])
  assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(META)
  assert (8 + n) % 8 == 0  # the data stays aligned, as safetensors writes it


def test_safetensors_reads_the_canonical_file(tmp_path):
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "x.safetensors")
  canonical.save_file(ARRAYS, path, META)
  with safe_open(path, "np") as f:
    assert f.metadata() == META and sorted(f.keys()) == sorted(ARRAYS)
    for k, v in ARRAYS.items():
      got = f.get_tensor(k)
      assert got.dtype == v.dtype and np.array_equal(got, v)


def test_canonical_bytes_only_reorders_the_header():
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  blob = save(ARRAYS, metadata=META)
  out = canonical.canonical_bytes(blob)
  (n,), (m,) = struct.unpack("<Q", blob[:8]), struct.unpack("<Q", out[:8])
  assert out[8 + m:] == blob[8 + n:]  # the data block is untouched
  assert json.loads(out[8:8 + m]) == json.loads(blob[8:8 + n])
  assert canonical.canonical_bytes(out) == out  # idempotent
