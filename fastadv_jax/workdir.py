"""The files of a workdir besides checkpoints and metrics: config.json and results.json."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import logging


def write_json(path: str, obj: Any) -> None:
  """Atomic: a reader (or a killed writer) never leaves a half-written file behind."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; warns when a resumed run's config differs from the stored one."""
  path = os.path.join(workdir, "config.json")
  now = config_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
      logging.warning("Config differs from the one stored in %s in: %s", path, changed)
  write_json(path, now)


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The run's config; fields added to the library since the run started take their defaults."""
  from fastadv_jax.configs import default  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  from fastadv_jax import config_validation  # pylint: disable=import-outside-toplevel
  stored = config_validation.migrate_stored_config(stored)
  config = default.get_config()
  config.update(stored)
  return config


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not a folder, not writable, or in use by another run."""


def prepare(workdir: str) -> None:
  """Creates the workdir if needed and checks that it is a writable folder, before any work."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} exists and is not a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror}") from None
  check_writable(workdir)


def check_writable(workdir: str) -> None:
  probe = os.path.join(workdir, f".write_test.{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror})") from None


class Lock:
  """An exclusive lock on a workdir for one run: `<workdir>/.lock`, held with flock(2) and
  holding the owner's process id. The kernel drops a flock when its process dies, however it
  dies, so a crashed run never leaves a lock that blocks the next one."""

  def __init__(self, workdir: str, enabled: bool = True):
    """`enabled=False`: a no-op (the processes other than 0 of a multi-process run)."""
    self.path = os.path.join(workdir, ".lock")
    self.file = None
    self.enabled = enabled

  def __enter__(self) -> "Lock":
    if not self.enabled:
      return self
    import fcntl  # pylint: disable=import-outside-toplevel
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      owner = f.read().strip() or "unknown"
      f.close()
      raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by another run "
                         f"(process {owner}); wait for it to finish or use another --workdir"
                         ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    self.file = f
    return self

  def __exit__(self, *exc) -> None:
    if self.file is not None:
      self.file.close()  # releases the flock
      self.file = None
