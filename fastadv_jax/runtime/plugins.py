"""Code from outside the package that registers methods, models or AutoAttack components.

A plugin is an ordinary Python module that calls the registries when it is imported:
`methods.register(...)`, `models.register(...)`, `autoattack.register(...)`. Two ways in:

- named per run: `--config.plugins=my_pkg.my_method,my_pkg.my_model` on `fastadv_jax.main` (the
  modules are imported before the config file is read, so their methods' hyperparameters are
  config fields like the built-in ones); `config.json` records the list, and
  `fastadv_jax.evaluate`, `torch_export` and `benchmark` import it again from there;
  config.json's `plugin_sources` says where each plugin came from (`sources`);
- installed: a package that declares an entry point in the group `fastadv_jax.plugins`
  (`[project.entry-points."fastadv_jax.plugins"] my_method = "my_pkg.my_method"`) is imported
  by every command line of this library, once per process.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Iterable, Sequence

__all__ = ["CONFIG_FLAG", "ENTRY_POINT_GROUP", "PluginError", "from_argv", "load",
           "load_entry_points", "load_for_command_line", "parse", "sources"]

ENTRY_POINT_GROUP = "fastadv_jax.plugins"
CONFIG_FLAG = "--config.plugins"

_loaded_entry_points = False
_entry_point_sources: dict[str, dict] = {}  # module -> where it came from, once loaded


class PluginError(ImportError):
  """A plugin module could not be imported (one line: the module and the reason)."""


def parse(spec: str | Sequence[str] | None) -> tuple[str, ...]:
  """'a.b, c' -> ('a.b', 'c'); a sequence is taken as it is."""
  if not spec:
    return ()
  parts = spec.split(",") if isinstance(spec, str) else spec
  return tuple(p.strip() for p in parts if p and p.strip())


def load(spec: str | Sequence[str] | None) -> tuple[str, ...]:
  """Imports each named module (comma-separated or a sequence); returns their names."""
  names = parse(spec)
  for name in names:
    try:
      importlib.import_module(name)
    except Exception as e:  # pylint: disable=broad-except  (any failure is the plugin's)
      raise PluginError(f"plugin {name!r} could not be imported: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from e
  return names


def load_entry_points() -> tuple[str, ...]:
  """Imports every installed plugin (entry-point group `fastadv_jax.plugins`), once."""
  global _loaded_entry_points  # pylint: disable=global-statement
  if _loaded_entry_points:
    return ()
  _loaded_entry_points = True
  names = []
  for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
    try:
      obj = ep.load()
    except Exception as e:  # pylint: disable=broad-except
      raise PluginError(f"installed plugin {ep.name!r} ({ep.value}) could not be imported: "
                        f"{type(e).__name__}: {e}") from e
    if callable(obj):  # an entry point may name a registration function instead of a module
      obj()
    names.append(ep.value)
    dist = getattr(ep, "dist", None)
    _entry_point_sources[ep.value] = {
        "entry_point": ep.name, "package": dist.name if dist else None,
        "version": dist.version if dist else None}
  return tuple(names)


def sources(spec: str | Sequence[str] | None = None) -> dict[str, dict]:
  """Where each plugin of this process came from, for the run's records: the installed ones
  (entry point, package, version) and the modules named in `spec`, each with the installed
  package and version that provide it, or else the file it was imported from."""
  out = dict(_entry_point_sources)
  for name in parse(spec):
    out.setdefault(name, _module_source(name))
  return out


def _module_source(name: str) -> dict:
  provided_by = importlib.metadata.packages_distributions().get(name.split(".")[0], [])
  if provided_by:
    return {"package": provided_by[0], "version": importlib.metadata.version(provided_by[0])}
  module = sys.modules.get(name)
  return {"package": None, "file": getattr(module, "__file__", None)}


def from_argv(argv: Iterable[str], flag: str = CONFIG_FLAG) -> str:
  """The value of `--config.plugins=...` (or `--config.plugins ...`) in a command line; the
  last one wins, as absl's flags do."""
  argv, value = list(argv), ""
  for i, arg in enumerate(argv):
    if arg.startswith(flag + "="):
      value = arg.split("=", 1)[1]
    elif arg == flag and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def load_for_command_line(argv: Sequence[str] | None = None, flag: str = CONFIG_FLAG
                          ) -> tuple[str, ...]:
  """Installed plugins, then those named on the command line: call before flags are parsed."""
  argv = sys.argv if argv is None else argv
  return load_entry_points() + load(from_argv(argv, flag))
