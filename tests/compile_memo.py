"""An in-memory memo of compiled XLA programs for a test process (not part of the library).

Many tests build a fresh training step, attack or evaluator for the same tiny model and config:
each build makes new Python closures, so `jax.jit` traces again and hands XLA a program it has
already compiled in this process. The persistent compilation cache cannot help on XLA:CPU here,
because jaxlib does not serialise programs that call oneDNN (the library's convolution flags for
the CNNs). This memo keeps each loaded executable under a key made of everything XLA compiles
from: the platform, the StableHLO module's bytes, the compile options and the devices. The same
key means the same program for the same devices, so a repeat gets the executable compiled the
first time: results are unchanged, only the compile time goes.

It wraps JAX's `jax._src.compiler.compile_or_get_cached`, an internal function; on a JAX where
that is missing or has another signature, `install()` leaves JAX as it is (the suite is then
slower, never different). Programs with host callbacks or profile-guided options are not
memoised. FASTADV_TEST_COMPILE_MEMO=0 turns it off.
"""
from __future__ import annotations

import collections
import hashlib
import inspect
import os

_EXPECTED = ("backend", "computation", "devices", "compile_options", "host_callbacks",
             "executable_devices", "pgle_profiler")
MAX_ENTRIES = 256  # executables kept (least recently used dropped): bounded memory per worker
stats = {"hits": 0, "misses": 0}


def _module_bytes(computation) -> bytes:
  """The module without its debug information (source locations: the same program traced from
  two tests differs only there), as JAX's persistent cache keys it."""
  import io  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir import passmanager  # pylint: disable=import-outside-toplevel
  with computation.context:
    stripped = computation.operation.clone()
    passmanager.PassManager.parse("builtin.module(strip-debuginfo)").run(stripped)
    out = io.BytesIO()
    stripped.write_bytecode(file=out)
    return out.getvalue()


def _key(backend, computation, devices, compile_options) -> tuple | None:
  try:
    module = hashlib.sha256(_module_bytes(computation)).digest()
    options = hashlib.sha256(compile_options.SerializeAsString()).digest()
  except Exception:  # pylint: disable=broad-except  (an unexpected object: do not memoise)
    return None
  return (backend.platform, module, options, tuple(d.id for d in devices.flat))


def install() -> bool:
  """Wraps JAX's compile entry point with the memo; False (JAX untouched) if it is switched off
  or JAX's internals are not the ones this was written against."""
  if os.environ.get("FASTADV_TEST_COMPILE_MEMO", "1") == "0":
    return False
  try:
    from jax._src import compiler  # pylint: disable=import-outside-toplevel
    original = compiler.compile_or_get_cached
    params = tuple(inspect.signature(original).parameters)
  except (ImportError, AttributeError, ValueError, TypeError):
    return False
  if params != _EXPECTED or getattr(original, "_fastadv_memo", False):
    return False
  memo: collections.OrderedDict = collections.OrderedDict()

  def compile_or_get_cached(backend, computation, devices, compile_options, host_callbacks,
                            executable_devices, pgle_profiler=None):
    key = None
    if not host_callbacks and pgle_profiler is None:
      key = _key(backend, computation, devices, compile_options)
    if key is not None and key in memo:
      memo.move_to_end(key)
      stats["hits"] += 1
      return memo[key]
    executable = original(backend, computation, devices, compile_options, host_callbacks,
                          executable_devices, pgle_profiler)
    if key is not None:
      stats["misses"] += 1
      memo[key] = executable
      while len(memo) > MAX_ENTRIES:
        memo.popitem(last=False)
    return executable

  compile_or_get_cached._fastadv_memo = True
  compiler.compile_or_get_cached = compile_or_get_cached
  return True
