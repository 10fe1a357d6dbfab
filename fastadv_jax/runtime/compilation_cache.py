"""JAX's persistent compilation cache for the command lines.

A second invocation that runs the same XLA programs (a resumed run, `evaluate` again on the same
run, a test suite's many small command lines) loads them from disk instead of compiling them
again. A cached program is the program XLA compiled, so results are the same bits with or
without the cache; only the start-up time changes.

Where: the folder in FASTADV_COMPILATION_CACHE; `0` or `off` turns the cache off; by default
`$XDG_CACHE_HOME/fastadv_jax/xla` (`~/.cache/fastadv_jax/xla`), capped at MAX_BYTES (JAX evicts
the least recently used programs). JAX keys every entry by the program, the jax/jaxlib versions,
the device and the XLA flags, so a folder shared by several versions or machines is safe.
Nothing depends on the cache for correctness: a folder that cannot be created or written turns
the cache off with one line, and an entry that cannot be read (a damaged file) is compiled
again and rewritten, also with one line.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import warnings

import jax

from fastadv_jax.runtime import cli_logging

ENV = "FASTADV_COMPILATION_CACHE"
MAX_BYTES = 2 * 1024**3
# Programs that compile faster than this are not worth a file (JAX's default is 1 s, which
# leaves out most of the small CNNs' programs whose compilation a start-up is made of);
# JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, when set, is used instead.
MIN_COMPILE_SECONDS = 0.1


def default_dir(environ: dict | None = None) -> str:
  env = os.environ if environ is None else environ
  base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "fastadv_jax", "xla")


def folder(environ: dict | None = None) -> str | None:
  """The cache folder the command lines use, or None when it is turned off."""
  env = os.environ if environ is None else environ
  raw = env.get(ENV, "").strip()
  if raw.lower() in ("0", "off", "false", "no"):
    return None
  return raw or default_dir(env)


def enable(environ: dict | None = None) -> str | None:
  """Points JAX's persistent cache at `folder()`; returns the folder, or None when off or
  unusable (one line on stderr says why). Call before the first compilation."""
  env = os.environ if environ is None else environ
  where = folder(env)
  if where is None:
    return None
  try:
    os.makedirs(where, exist_ok=True)
    probe = os.path.join(where, f".write-test-{os.getpid()}")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    print(f"warning: compilation cache off: cannot write {where} ({e.strerror or e}); set "
          f"{ENV} to another folder, or to 0", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", where)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in env:  # JAX's own variable wins
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  if not getattr(warnings.showwarning, "compilation_cache_lines", False):  # once per process
    _one_line_for_unreadable_entries()
  return where


def _one_line_for_unreadable_entries() -> None:
  """JAX warns, and compiles again, for each entry it cannot read or write. Here each kind is
  one line for the whole process. An entry that cannot be read is removed, since JAX never
  replaces an entry that exists (a damaged one would be compiled again in every later run):
  this run writes it anew. A program that cannot be written is one that jaxlib cannot
  serialise: on XLA:CPU those that call oneDNN (this library's default flags for convolutions,
  xla_cpu.py) fail with std::bad_alloc, so they compile on every start; that is said only
  with FASTADV_VERBOSE=1. The folder is the one JAX uses when the warning comes."""
  shown = warnings.showwarning
  said = set()

  def show(message, category, filename, lineno, file=None, line=None):
    text = str(message)
    if "compilation cache" not in text.lower():
      shown(message, category, filename, lineno, file, line)
      return
    where = jax.config.jax_compilation_cache_dir
    reading = "reading" in text.lower()
    program = re.search(r"cache entry for '([^'/]+)'", text)
    if reading and program:
      for path in glob.glob(os.path.join(glob.escape(where), program.group(1) + "-*")):
        with contextlib.suppress(OSError):
          os.remove(path)
    if not reading and not cli_logging.verbose():
      return  # expected on XLA:CPU with oneDNN (the docstring above); FASTADV_VERBOSE=1 shows it
    if reading not in said:
      said.add(reading)
      first = text.strip().splitlines()[0][:160]
      then = ("compiled again, and the damaged entries rewritten" if reading else
              "such programs are compiled on every start")
      print(f"warning: compilation cache {where}: {first} ({then})", file=sys.stderr)

  show.compilation_cache_lines = True
  warnings.showwarning = show
