"""safetensors files whose bytes are a function of their content.

safetensors writes its JSON header from a Rust hash map, so the metadata
(and, in principle, the tensor entries) come out in a different order in
each process: two identical exports differ byte for byte, and a file's hash
cannot name a model. `save_file` writes the same file with the header's keys
sorted and compact, padded to safetensors' 8-byte alignment; the data block
is safetensors' own, so every reader loads it as before.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Mapping, Optional

import numpy as np

_ALIGN = 8  # safetensors pads the header so that the data starts 8-byte aligned


def canonical_bytes(blob: bytes) -> bytes:
  """A safetensors file's bytes with its header in one canonical form.

  Args:
    blob: a whole safetensors file (8-byte little-endian header length, the
      JSON header, the data).

  Returns:
    The same file with the header's keys sorted at every level and no
    spaces, padded with spaces to the alignment.
  """
  (n,) = struct.unpack("<Q", blob[:8])
  header = json.loads(blob[8:8 + n])
  text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  text += b" " * (-(8 + len(text)) % _ALIGN)
  return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def save_file(arrays: Mapping[str, np.ndarray], path: str,
              metadata: Optional[Mapping[str, str]] = None) -> None:
  """`safetensors.numpy.save_file`, with canonical bytes, written atomically.

  Args:
    arrays: tensor name -> numpy array.
    path: the file to write (replaced whole: a reader never sees half a file).
    metadata: string -> string map stored in the header's `__metadata__`.
  """
  from safetensors.numpy import save  # pylint: disable=import-outside-toplevel
  blob = canonical_bytes(save(dict(arrays), metadata=dict(metadata) if metadata else None))
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(blob)
  os.replace(tmp, path)
