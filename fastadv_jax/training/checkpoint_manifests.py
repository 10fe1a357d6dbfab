"""SHA-256 manifests of a run's checkpoints, and the quarantine of damaged ones.

After each save the digest of every file of the checkpoint is written to
`<workdir>/checksums/<step>.json`. A checkpoint whose bytes no longer match is moved, with its
manifest, to `<workdir>/corrupt_checkpoints/<step>-<time>/` rather than deleted: the user can
still look at it, and the run falls back to the previous one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Iterable

from absl import logging

from fastadv_jax.training import workdir
from fastadv_jax.training.checkpoint_store import CheckpointCorrupt


def _digest(step_dir: str) -> dict[str, str]:
  """SHA-256 of every file below a checkpoint folder, by relative path."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      h = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
      out[os.path.relpath(path, step_dir)] = h.hexdigest()
  return dict(sorted(out.items()))


class Manifests:
  """The manifests of the checkpoints in `<run>/checkpoints`, kept in `<run>/checksums`."""

  def __init__(self, run_dir: str, directory: str):
    self.run_dir, self.directory = run_dir, directory
    self.checksums = os.path.join(run_dir, "checksums")

  def write(self, step: int, kept: Iterable[int]) -> None:
    """The manifest of checkpoint `step`; those of checkpoints not `kept` (rotated out) go."""
    os.makedirs(self.checksums, exist_ok=True)
    workdir.write_json(os.path.join(self.checksums, f"{step}.json"),
                       _digest(os.path.join(self.directory, str(step))))
    names = {f"{s}.json" for s in kept}
    for name in os.listdir(self.checksums):
      if name.endswith(".json") and name not in names:
        os.remove(os.path.join(self.checksums, name))

  def verify(self, step: int) -> None:
    """Raises CheckpointCorrupt if the checkpoint's files differ from its manifest. A checkpoint
    without a manifest (killed between the save and the manifest) is checked by restoring."""
    manifest = os.path.join(self.checksums, f"{step}.json")
    if not os.path.exists(manifest):
      return
    with open(manifest) as f:
      expected = json.load(f)
    got = _digest(os.path.join(self.directory, str(step)))
    bad = sorted(k for k in set(expected) | set(got) if expected.get(k) != got.get(k))
    if bad:
      raise CheckpointCorrupt(f"checkpoint {os.path.join(self.directory, str(step))}: "
                              f"{len(bad)} file(s) differ from their checksums ({bad[0]}, ...)")

  def quarantine(self, step: int, why: Exception) -> None:
    """Moves checkpoint `step` and its manifest aside, with a warning saying why."""
    dest = os.path.join(self.run_dir, "corrupt_checkpoints", f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), dest)
    manifest = os.path.join(self.checksums, f"{step}.json")
    if os.path.exists(manifest):
      shutil.move(manifest, os.path.join(dest, "checksums.json"))
    logging.warning("%s. Moved it to %s; falling back to the previous checkpoint.", why, dest)

  def corrupt_dir(self) -> str:
    return os.path.join(self.run_dir, "corrupt_checkpoints")
