"""The package's layers, read from its import graph (fastadv_jax/__init__.py lists them).

Each module's imports are parsed, not executed, so a test fails on the import line that breaks a
rule, whatever the import order at run time."""
from __future__ import annotations

import ast
import os
import pathlib
import shutil
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fastadv_jax"
LIBRARY = ("attacks", "autoattack", "gradalign", "losses", "methods", "models", "parallel",
           "randomness", "registry")
COMMANDS = ("main", "evaluate", "benchmark", "torch_export", "torch_import")
# Lowest first; a module may import its own layer and the ones before it.
LAYERS = ("runtime", "library", "data", "training", "interop", "cli", "commands")
# Third-party modules imported inside a function, each for a reason: optional extras (torch,
# psutil), and TensorFlow (through TFDS), which takes seconds to load and is needed only when
# data is read.
LAZY_OK = ("torch", "psutil", "tensorflow_datasets")


def _layer(module: str) -> str:
  parts = module.split(".")[1:]  # without "fastadv_jax"
  if not parts:
    return "library"  # the package's front door re-exports the library
  head = parts[0]
  if head in ("runtime", "data", "training", "interop", "cli"):
    return head
  if head in COMMANDS:
    return "commands"
  if head in LIBRARY:
    return "library"
  if head == "configs":
    return "commands"  # the config files sit above the trainer (they import methods, schedules)
  raise AssertionError(f"module {module} is in no layer: add it to one (fastadv_jax/__init__.py)")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = ("fastadv_jax",) + path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """(module-level imports, imports inside functions): (imported module, line) pairs; for
  `from package import name`, the submodule where there is one."""
  tree = ast.parse(path.read_text())
  inner_lines = {sub.lineno for fn in ast.walk(tree)
                 if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for sub in ast.walk(fn) if isinstance(sub, (ast.Import, ast.ImportFrom))}
  modules = _modules()
  top, inner = [], []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
               for a in node.names]
    else:
      continue
    (inner if node.lineno in inner_lines else top).extend((m, node.lineno) for m in found)
  return top, inner


def test_every_import_runs_down_the_layers():
  wrong = []
  for name, path in _modules().items():
    top, inner = _imports(name, path)
    for target, line in top + inner:
      if target.startswith("fastadv_jax") and not target.startswith("fastadv_jax.configs"):
        if LAYERS.index(_layer(target)) > LAYERS.index(_layer(name)):
          wrong.append(f"{path.name}:{line} ({_layer(name)}) imports {target} "
                       f"({_layer(target)})")
  assert not wrong, "\n".join(wrong)


def test_the_library_never_imports_a_config_library():
  wrong = []
  for name, path in _modules().items():
    if _layer(name) not in ("runtime", "library"):
      continue
    wrong += [f"{name}:{line} imports {m}" for m, line in sum(_imports(name, path), [])
              if m.split(".")[0] == "ml_collections" or m.startswith("fastadv_jax.configs")]
  assert not wrong, "\n".join(wrong)


def test_no_imports_inside_functions_but_heavy_optional_ones():
  wrong = []
  for name, path in _modules().items():
    _, inner = _imports(name, path)
    wrong += [f"{path.relative_to(PACKAGE)}:{line} imports {m} inside a function"
              for m, line in inner if m.split(".")[0] not in LAZY_OK]
  assert not wrong, "\n".join(wrong)


def test_no_import_circles():
  modules = _modules()
  graph = {name: {m for m, _ in _imports(name, path)[0] if m in modules and m != name}
           for name, path in modules.items()}
  # A package's __init__ and its submodules are one unit here (a submodule's import runs the
  # package first); circles between units are what this test refuses.
  def unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else module
  units: dict[str, set[str]] = {}
  for name, targets in graph.items():
    units.setdefault(unit(name), set()).update(unit(t) for t in targets if unit(t) != unit(name))
  state: dict[str, int] = {}
  def visit(node: str, trail: list[str]) -> None:
    state[node] = 1
    for nxt in sorted(units.get(node, ())):
      if state.get(nxt) == 1:
        pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [node, nxt])
                    if nxt in trail else f"import circle through {node} -> {nxt}")
      if nxt not in state:
        visit(nxt, trail + [node])
    state[node] = 2
  for node in sorted(units):
    if node not in state:
      visit(node, [])


def test_a_dozen_modules_at_the_top():
  top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
  assert len(top) <= 12, top
  assert set(top) == set(LIBRARY + COMMANDS) - {"autoattack", "methods"}, top


def _copy_with(tmp_path, monkeypatch, module: str, extra: str) -> None:
  """Points the checks at a copy of the package where `module` ends with `extra`."""
  copy = tmp_path / f"{len(list(tmp_path.iterdir()))}" / "fastadv_jax"
  shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
  path = copy / module
  path.write_text((path.read_text() if path.exists() else "") + extra)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)


def test_the_checks_catch_what_they_look_for(tmp_path, monkeypatch):
  """Each rule above fails on a copy of the package with one module that breaks it, so that a
  passing run means something."""
  _copy_with(tmp_path, monkeypatch, "losses.py", "\nfrom fastadv_jax.training import train\n")
  with pytest.raises(AssertionError, match=r"losses.py:\d+ \(library\) imports "
                                           r"fastadv_jax.training.train \(training\)"):
    test_every_import_runs_down_the_layers()
  _copy_with(tmp_path, monkeypatch, "randomness.py", "\nimport ml_collections\n")
  with pytest.raises(AssertionError, match=r"fastadv_jax.randomness:\d+ imports ml_collections"):
    test_the_library_never_imports_a_config_library()
  _copy_with(tmp_path, monkeypatch, "attacks.py", "\ndef f():\n  from fastadv_jax import losses\n")
  with pytest.raises(AssertionError, match=r"attacks.py:\d+ imports fastadv_jax.losses inside"):
    test_no_imports_inside_functions_but_heavy_optional_ones()
  _copy_with(tmp_path, monkeypatch, "losses.py", "\nfrom fastadv_jax import gradalign\n")
  with pytest.raises(pytest.fail.Exception, match="import circle: .*gradalign.*losses"):
    test_no_import_circles()
  _copy_with(tmp_path, monkeypatch, "extra.py", "")
  with pytest.raises(AssertionError, match="extra"):
    test_a_dozen_modules_at_the_top()


def test_the_size_check_passes_and_refuses_a_grown_piece(monkeypatch, capsys):
  """scripts/check_sizes.py (run by CI): passes on the package as it is, with no piece listed
  over the limits; fails once a piece crosses a limit, or a listed one is bigger than its
  entry."""
  sys.path.insert(0, str(PACKAGE.parent / "scripts"))
  try:
    import check_sizes  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  assert check_sizes.main([]) == 0
  assert check_sizes.OVER_THE_LIMIT == {} and check_sizes.over_the_limit() == {}
  _, name, lines = max((p for p in check_sizes.pieces() if p[0] == "class"),
                          key=lambda p: p[2])
  monkeypatch.setattr(check_sizes, "CLASS_LINES", lines - 1)  # the largest class crosses it
  assert check_sizes.main([]) == 1
  assert f"{name}: {lines} lines (the limit is {lines - 1}" in capsys.readouterr().err
  monkeypatch.setattr(check_sizes, "OVER_THE_LIMIT", {name: lines})  # listed at its size
  assert check_sizes.main([]) == 0
  monkeypatch.setattr(check_sizes, "OVER_THE_LIMIT", {name: lines - 1})  # then grown
  assert check_sizes.main([]) == 1
  assert f"{name}: {lines} lines, more than the {lines - 1}" in capsys.readouterr().err


def test_the_command_lines_import_together():
  """They share flag names (workdir, weights, config), defined once (cli/shared_flags.py), so
  one process may import them all: the API reference does, without patching pdoc; each
  command's --help still lists them."""
  import subprocess  # pylint: disable=import-outside-toplevel
  code = ("import fastadv_jax.main, fastadv_jax.evaluate, fastadv_jax.torch_export, "
          "fastadv_jax.torch_import\n"
          "from absl import flags\n"
          "print(*(n in flags.FLAGS for n in ('workdir', 'weights', 'config', 'out', 'eps')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["True"] * 5
  # Each takes only its own: training has no --weights, the exporter no --config.
  for command, takes, lacks in (("main", ("--workdir", "--config"), "--weights"),
                                ("torch_export", ("--workdir", "--weights"), "--config")):
    helped = subprocess.run([sys.executable, "-m", f"fastadv_jax.{command}", "--help"],
                            capture_output=True, text=True, check=False,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert all(flag in helped.stdout for flag in takes), helped.stdout[-2000:]
    assert lacks not in helped.stdout
