"""Test set-up: the repository root on sys.path (for `configs`), and markers."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
