"""A name -> record table open to code outside the package: the one implementation behind the
method, model and AutoAttack-component registries (methods/, models.py, autoattack/component.py).

Records are immutable dataclasses named by a `name` field. A record chosen by name may own
hyperparameters: a frozen dataclass type (`args`) whose defaults are the published values and
whose `__post_init__` refuses values it cannot run with (`check`); `make_args` builds one from a
config's plain values. Methods and models share this (`config.method_args.<method>.<field>`,
`config.model_args.<model>.<field>`). Registering the same record again is a
no-op (a plugin module imported twice), and a *different* record under a taken name is refused,
so one name never means two things in a process. Reads go to the live table, so everything that
validates or lists names sees what plugins registered after import time.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

__all__ = ["ArgError", "NoArgs", "Registry", "arg_names", "args_from_section", "check",
           "make_args"]

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


class ArgError(ValueError):
  """A hyperparameter out of range; `field` names it (for `config.<kind>_args.<name>.<field>`)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field, self.message = field, message


def check(cond: bool, field: str, message: str) -> None:
  """For an args record's `__post_init__`: ArgError naming `field` unless `cond`."""
  if not cond:
    raise ArgError(field, message)


@dataclasses.dataclass(frozen=True)
class NoArgs:
  """The hyperparameters of a record that has none of its own."""


def is_args_type(args: Any) -> bool:
  return dataclasses.is_dataclass(args) and isinstance(args, type)


def arg_names(args: type) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(args))


def make_args(args: type, values: Mapping[str, Any] | None, owner: str) -> Any:
  """An `args` record from a mapping of field values (missing fields take their defaults),
  each converted to the field's declared type (a list to a tuple for tuple fields); ArgError
  names a bad or unknown field. `owner` names the record for the message (e.g. "nfgsm")."""
  values = dict(values or {})
  names = arg_names(args)
  unknown = sorted(set(values) - set(names))
  if unknown:
    raise ArgError(unknown[0], f"not a hyperparameter of {owner} (it has "
                   f"{', '.join(names) or 'none'})")
  hints = typing.get_type_hints(args)
  converted = {}
  for k, v in values.items():
    t = hints.get(k)
    if t in (int, float) and isinstance(v, (int, float)) and not isinstance(v, bool):
      if t is int and float(v) != int(v):
        raise ArgError(k, f"must be an integer, got {v}")
      v = t(v)
    elif t in (int, float, bool, str) and not isinstance(v, t):
      raise ArgError(k, f"must be {t.__name__}, got {v!r}")
    elif typing.get_origin(t) is tuple and isinstance(v, (list, tuple)):
      v = tuple(v)
    converted[k] = v
  return args(**converted)


def args_from_section(make: Callable[[Mapping[str, Any]], Any], section: Any) -> Any:
  """A record's args from its config section (`config.method_args.<name>`, a ConfigDict or a
  mapping; None or absent fields: the defaults), built by the record's `make_args`."""
  return make(section.to_dict() if hasattr(section, "to_dict") else dict(section or {}))
