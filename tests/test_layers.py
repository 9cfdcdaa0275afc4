"""The layers of `baq` (its docstring) hold: no module imports upward.

Every import of every module under baq/ (top-level, inside functions and
under TYPE_CHECKING alike) is read with `ast`, and each `baq.*` target is
placed in its layer. A module may import its own package and anything in a
lower layer; two packages of one layer are independent of each other.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import baq  # noqa: E402  pylint: disable=wrong-import-position


def _modules():
  """(dotted name, path) of every module under baq/."""
  base = os.path.join(ROOT, "baq")
  for dirpath, _, files in os.walk(base):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        yield rel.removesuffix(".__init__"), path


def _imports(name, path):
  """Every baq module or name that `path` imports: (line, dotted target)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield node.lineno, a.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1])
        mod = f"{base}.{node.module}" if node.module else base
      else:
        mod = node.module or ""
      for a in node.names:
        yield node.lineno, f"{mod}.{a.name}"


def test_every_package_has_a_layer():
  names = {name for name, _ in _modules()}
  placed = {n for n in names if baq.layer_of(n) is not None}
  assert placed == names, sorted(names - placed)


def test_no_module_imports_upward():
  upward = []
  for name, path in _modules():
    mine = baq.layer_of(name)
    for line, target in _imports(name, path):
      if not (target == "baq" or target.startswith("baq.")):
        continue
      theirs = baq.layer_of(target)
      if theirs is None or baq.owner(target) == baq.owner(name):
        continue
      if theirs >= mine:
        upward.append(f"{path}:{line}: {name} (layer {mine}) imports {target} (layer {theirs})")
  assert not upward, "\n".join(upward)


@pytest.mark.parametrize("name,target,allowed", [
    ("baq.train.loop", "baq.experiment.job", False),  # up
    ("baq.fairness.stereotype", "baq.study.bias.report", False),  # up
    ("baq.fairness.metrics", "baq.data.pipeline", False),  # across one layer
    ("baq.experiment.job", "baq.train.loop", True),
    ("baq.study.lm.study", "baq.study.compare", True),  # within a package
    ("baq.fairness.stereotype", "baq.stats.corrections", True),
])
def test_the_rule_itself(name, target, allowed):
  """The check above can fail: upward and sideways imports are caught."""
  mine, theirs = baq.layer_of(name), baq.layer_of(target)
  ok = baq.owner(target) == baq.owner(name) or theirs < mine
  assert ok is allowed
