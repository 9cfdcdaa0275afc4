"""A tiny named registry, shared by every pluggable piece of baq.

Models, datasets, regularizers, parametrizations and training modes are each
one decorated function or class in a `Registry`. Looking up an unknown name
raises a `KeyError` that lists the valid names, so a typo in a config never
fails silently or deep inside a trainer.

A registry built with `discover="some.package"` imports every module of that
package the first time it is asked for a name, so a new entry is one new file
in that package that registers itself, and no other file changes. Its
subpackages are not imported: a subpackage is another kind of entry with a
registry of its own (`baq.models.lm`, `baq.models.clip` under the image
classifiers' `baq.models`).

A registry built with `derive=fn` also holds the entries `fn()` returns,
asked at every lookup: entries made from another registry (a quantization
method per runtime numeric, `baq.quant.methods`) stay in step with it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps names to objects; `get` on an unknown name lists the valid ones."""

  def __init__(self, kind: str, discover: Optional[str] = None,
               derive: Optional[Callable[[], Dict[str, T]]] = None):
    self.kind = kind
    self._items: Dict[str, T] = {}
    self._discover = discover
    self._derive = derive

  def _discovered(self) -> Dict[str, T]:
    """The entries, after importing every module of the `discover` package once."""
    if self._discover is not None:
      package, self._discover = self._discover, None
      try:
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__):
          if not info.name.startswith("_") and not info.ispkg:
            importlib.import_module(f"{package}.{info.name}")
      except BaseException:
        self._discover = package  # a broken module fails every lookup, not just the first
        raise
    if self._derive is None:
      return self._items
    derived = self._derive()
    clash = sorted(set(derived) & set(self._items))
    if clash:
      raise ValueError(f"{self.kind} {clash} registered twice: by name and derived.")
    return {**self._items, **derived}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator that registers `obj` under `name` and returns it unchanged."""

    def wrap(obj: T) -> T:
      if name in self._items:
        raise ValueError(f"{self.kind} {name!r} is already registered.")
      self._items[name] = obj
      return obj

    return wrap

  def get(self, name: str) -> T:
    """Returns the object registered under `name`.

    Raises:
      KeyError: `name` is unknown; the message lists the valid names.
    """
    items = self._discovered()
    try:
      return items[name]
    except KeyError:
      valid = ", ".join(sorted(items)) or "(none registered)"
      raise KeyError(
          f"Unknown {self.kind} {name!r}. Valid {self.kind} names: {valid}."
      ) from None

  def unregister(self, name: str) -> None:
    """Removes `name` (e.g. to re-register while editing in a notebook)."""
    self.get(name)  # Raises, listing the valid names, if unknown.
    if name not in self._items:
      raise ValueError(f"{self.kind} {name!r} is derived: remove it from its source.")
    del self._items[name]

  def names(self) -> list[str]:
    return sorted(self._discovered())

  def __contains__(self, name: str) -> bool:
    return name in self._discovered()

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
