"""Console logging for the command-line tools: our INFO lines, not the libraries' start-up
notices or Orbax's per-save chatter.

`quiet_startup()` runs first in every command line, before TensorFlow (imported by TFDS to read
data) or jax start their backends. It keeps from the console, unless FASTADV_VERBOSE=1:
- TensorFlow's C++ INFO and WARNING lines (`TF_CPP_MIN_LOG_LEVEL=2`: cpu_feature_guard's "This
  TensorFlow binary is optimized ...", tf.data's end-of-sequence notices) and its oneDNN notice,
  which TensorFlow prints while it loads, before it reads that variable, and which only
  `TF_ENABLE_ONEDNN_OPTS=0` prevents (with it the first absl C++ line goes too: "All log
  messages before absl::InitializeLog() ..."). TensorFlow here only reads and decodes uint8
  images (datasets.py), where oneDNN's kernels compute nothing; jaxlib's XLA does not read the
  variable (its oneDNN use is set by XLA_FLAGS, xla_cpu.py), so no number of a run changes;
- JAX's INFO lines ("Unable to initialize backend 'tpu'", "Connecting to JAX distributed
  service ..."): the `jax` Python logger is set to WARNING, so its warnings (e.g. a GPU present
  but a CPU-only jaxlib installed) still show;
- Orbax's and TFDS's INFO lines, and two of their warnings that are expected (the filter of
  `setup()`, `_EXPECTED_WARNINGS`).
Variables the user set are kept as they are (`setdefault`). FASTADV_VERBOSE=1 (or true/yes)
changes nothing: every line comes back.
"""
from __future__ import annotations

import atexit
import logging as py_logging
import os
import sys
import threading

from absl import logging

VERBOSE_ENV = "FASTADV_VERBOSE"
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def verbose() -> bool:
  """Whether the user asked for every library line (FASTADV_VERBOSE=1)."""
  return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet_startup() -> None:
  """Silences the libraries' start-up notices (see the module docstring); call it before
  TensorFlow is imported and before JAX's backends start. A no-op with FASTADV_VERBOSE=1."""
  if verbose():
    return
  for name, value in QUIET_ENV.items():
    os.environ.setdefault(name, value)
  jax_logger = py_logging.getLogger("jax")
  if jax_logger.level == py_logging.NOTSET and not os.environ.get("JAX_LOGGING_LEVEL"):
    jax_logger.setLevel(py_logging.WARNING)


# Library warnings that are no news to a user of the command lines, each matched exactly:
# Orbax's on reading a checkpoint that its StandardCheckpointer did not write itself (the
# trainer's CheckpointManager writes the manager-level metadata instead), and TFDS's on a
# data_dir without the prepared data set (datasets.py then says what is missing, in one line).
_EXPECTED_WARNINGS = (("/orbax/", "Metadata file does not exist: "),
                      ("/tensorflow_datasets/", "Variant folder "))


class _DropLibraryInfo(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    for where, start in _EXPECTED_WARNINGS:
      if where in record.pathname and str(record.msg).startswith(start):
        return False
    noisy = "/orbax/" in record.pathname or "/tensorflow_datasets/" in record.pathname
    return record.levelno >= py_logging.WARNING or not noisy


def setup() -> None:
  logging.set_verbosity(logging.INFO)
  if not verbose():
    logging.get_absl_handler().addFilter(_DropLibraryInfo())


GLOO_PREFIX = b"[Gloo] "


def drop_gloo_lines() -> None:
  """Gloo (JAX's cross-process collectives on CPU) prints "[Gloo] Rank N is connected to ..."
  from C++ to standard output each time it connects a set of devices, out of Python's reach,
  from its own threads and at any time, the process's exit included. Unless
  FASTADV_VERBOSE=1, standard output then goes through a pipe whose reader thread passes on
  every other line. At exit, what was written so far is passed on (a marker line through the
  pipe says when the reader has caught up), and the pipe stays: a Gloo line written later,
  while JAX shuts down, is dropped too instead of reaching the terminal (or half of it, as
  when the output was handed back to the terminal mid-line)."""
  if verbose():
    return
  sys.stdout.flush()
  original = os.dup(1)
  read_fd, write_fd = os.pipe()
  os.dup2(write_fd, 1)
  os.close(write_fd)
  caught_up = threading.Event()
  marker = b"\0fastadv: the output so far is passed on\0"

  def forward() -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
      pending = b""
      while chunk := pipe.read(65536):
        pending += chunk
        at_exit = marker in pending
        *lines, pending = pending.replace(marker, b"").split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not line.startswith(GLOO_PREFIX))
        if at_exit:  # a last line without its newline (a progress bar's) goes out as it is
          kept += b"" if pending.startswith(GLOO_PREFIX) else pending
          pending = b""
        if kept:
          os.write(original, kept)
        if at_exit:
          caught_up.set()

  reader = threading.Thread(target=forward, name="drop-gloo-lines", daemon=True)
  reader.start()

  def pass_on() -> None:
    sys.stdout.flush()
    os.write(1, marker)
    caught_up.wait(timeout=5)

  atexit.register(pass_on)
