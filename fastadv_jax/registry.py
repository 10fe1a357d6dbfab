"""A name -> record table open to code outside the package: the one implementation behind the
method, model and AutoAttack-component registries (methods/, models.py, autoattack/component.py).

Records are immutable dataclasses named by a `name` field. Registering the same record again is a
no-op (a plugin module imported twice), and a *different* record under a taken name is refused,
so one name never means two things in a process. Reads go to the live table, so everything that
validates or lists names sees what plugins registered after import time.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

__all__ = ["Registry"]

R = TypeVar("R")


class Registry(Generic[R]):
  """Records of one `kind` ("method", "model", ...), of type `record_type`, by name."""

  def __init__(self, kind: str, record_type: type, hint: str = ""):
    self.kind, self.record_type, self.hint = kind, record_type, hint
    self._records: dict[str, R] = {}

  def register(self, record: R, check: Callable[[R], None] | None = None) -> R:
    """Adds `record` under `record.name` (after `check(record)`, which may raise); returns it."""
    if not isinstance(record, self.record_type):
      raise TypeError(f"register takes {self.record_type.__name__} records, got "
                      f"{type(record).__name__}")
    old = self._records.get(record.name)
    if old is not None and old != record:
      article = "an" if self.kind[:1].lower() in "aeiou" else "a"
      raise ValueError(f"{article} {self.kind} named {record.name!r} is already registered with "
                       "another record; choose another name")
    if old is None and check is not None:
      check(record)
    self._records[record.name] = record
    return record

  def unregister(self, name: str) -> None:
    """Removes `name` (a notebook redefining a record, a test cleaning up)."""
    if name not in self._records:
      raise ValueError(f"no {self.kind} named {name!r} is registered")
    del self._records[name]

  def names(self) -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(self._records)

  def get(self, name: str) -> R:
    """The record named `name`; ValueError naming the registered ones if there is none."""
    try:
      return self._records[name]
    except (KeyError, TypeError):
      raise ValueError(f"unknown {self.kind} {name!r}; choose from {self.names()}"
                       f"{self.hint}") from None

  def __iter__(self) -> Iterator[R]:
    return iter(list(self._records.values()))
