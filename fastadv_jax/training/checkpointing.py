"""Orbax checkpoints of the run: train state, early-stopping weights and run bookkeeping.

Saves are synchronous and atomic (Orbax writes to a temporary folder and renames), so a run
killed at any moment leaves the previous checkpoint intact. After each save a SHA-256 manifest of
the checkpoint's files is written to `<workdir>/checksums/<step>.json`; `restore_latest` checks
it, and a checkpoint whose bytes changed (or that cannot be read) is moved to
`<workdir>/corrupt_checkpoints/` with a warning and the previous one is used (in a multi-process
run process 0 alone checks and moves, and the others restore the step it restored). A
checkpoint that does not fit the config is an error, not a fallback. Failures are
CheckpointErrors naming the folder and what to do, not library tracebacks.

A checkpoint of model variables alone (`save_variables`, e.g. imported weights) has the same
items; its `state` is just {'params', 'batch_stats'}. `restore_variables` reads the weights of
either kind without an optimiser to restore into; `restore` fills the rest of a train state
from its template (a run started on such a workdir trains from those weights).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging

import jax

from fastadv_jax.runtime import distributed
from fastadv_jax.training.checkpoint_manifests import Manifests
from fastadv_jax.training.checkpoint_store import (VARIABLES_ONLY, CheckpointCorrupt,
                                                   CheckpointError, CheckpointMismatch,
                                                   CheckpointStore)

__all__ = ["Checkpointer", "CheckpointError", "CheckpointMismatch", "CheckpointCorrupt",
           "VARIABLES_ONLY"]

# What process 0 tells the others when it restores no checkpoint (`_NONE`) or refuses them.
_NONE, _REFUSED = -1, -2


class Checkpointer:
  """The checkpoints of one run: `<workdir>/checkpoints` (checkpoint_store.py), their manifests
  (checkpoint_manifests.py), and the newest intact one to resume from, agreed by every
  process."""

  def __init__(self, workdir: str, max_to_keep: int = 2, read_only: bool = False,
               global_arrays: bool = False):
    """`read_only`: a reader of another run's checkpoints (evaluate, export) creates, deletes
    and cleans up nothing: Orbax's clean-up of temporary folders would otherwise remove the
    checkpoint a running training is writing, and runs in a thread that a reader ending early
    (an error) cuts off with a traceback.

    `global_arrays` (the shard_map engine, engines.py): the train state is saved and restored
    as the global `jax.Array`s it is, every process writing and reading its own shards (its
    template's shardings say which); the early-stopping weights and the bookkeeping stay host
    data that process 0 writes. Otherwise the state is a host pytree that process 0 alone
    writes and every process reads in full."""
    self.global_arrays = global_arrays
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.store = CheckpointStore(self.directory, max_to_keep, read_only, global_arrays)
    self.manifests = Manifests(self.workdir, self.directory)

  def latest_step(self) -> int | None:
    return self.store.manager.latest_step()

  def save(self, step: int, state: Any, best: Any, meta: dict) -> None:
    """`best` is a host pytree; `state` too (e.g. an unreplicated TrainState) unless
    `global_arrays`, where it is the global arrays. With several processes only process 0
    writes host data, and every process waits until the checkpoint is complete."""
    if self.global_arrays and jax.process_count() > 1:
      self.store.write(step, state, best, meta)
      distributed.barrier(f"checkpoint_shards_{step}")
      if distributed.is_main():
        self.manifests.write(step, self.store.steps())
    elif distributed.is_main():
      self.store.write(step, state, best, meta)
      self.manifests.write(step, self.store.steps())
    distributed.barrier(f"checkpoint_{step}")

  def save_variables(self, step: int, variables: Any, meta: dict) -> None:
    """Checkpoints model variables ({'params', 'batch_stats'}) alone, as both the last and the
    early-stopped weights: weights that never trained here (an import) have no optimiser or
    method state, and none is made up for them."""
    self.save(step, variables, variables, {**meta, VARIABLES_ONLY: True})

  def verify(self, step: int) -> None:
    """Raises CheckpointCorrupt if checkpoint `step`'s files differ from its manifest."""
    self.manifests.verify(step)

  def restore_latest(self, state_template: Any, best_template: Any
                     ) -> tuple[int, Any, Any, dict] | None:
    """The newest intact checkpoint as (step, state, best, meta), or None if there is none.

    Corrupt checkpoints are moved aside with a warning and the previous one is tried; a
    checkpoint that does not fit the templates (another config) raises CheckpointError.
    Several processes: process 0 alone decides (`_restore_as_process_0_decides`).
    """
    if jax.process_count() > 1 and self.global_arrays:
      return _restore_global_arrays(self, state_template, best_template)
    if jax.process_count() > 1:
      return _restore_as_process_0_decides(self, state_template, best_template)
    return _restore_newest_intact(self, state_template, best_template)

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with checkpoint `step` (what the trainer passed to `save`)."""
    return self.store.meta(step)

  def restore(self, step: int, state_template: Any, best_template: Any
              ) -> tuple[Any, Any, dict]:
    """(state, best, meta) of checkpoint `step` (CheckpointStore.restore)."""
    return self.store.restore(step, state_template, best_template)

  def restore_variables(self, step: int, template: Any, averaged: bool = False
                        ) -> tuple[Any, Any, dict]:
    """(last, best, meta) of checkpoint `step` as model variables
    (CheckpointStore.restore_variables)."""
    return self.store.restore_variables(step, template, averaged)

  def close(self) -> None:
    self.store.close()

  def quarantine(self, step: int, why: Exception, reopen: bool = True) -> None:
    """Moves checkpoint `step` aside (Manifests.quarantine) and, with `reopen`, reopens the
    store, whose list of steps changed."""
    self.manifests.quarantine(step, why)
    if reopen:
      self.store.reopen()

  def no_intact_left(self, tried: list[str]) -> CheckpointError:
    return CheckpointError(f"no intact checkpoint left in {self.directory}; it could not be "
                           f"restored: {tried[0]}. The damaged ones are in "
                           f"{self.manifests.corrupt_dir()}. To train again from the start, "
                           "use a new --workdir")


def _restore_newest_intact(ckpt: Checkpointer, state_template: Any, best_template: Any
                           ) -> tuple[int, Any, Any, dict] | None:
  """One process: the newest checkpoint that verifies and restores, damaged ones moved aside."""
  tried = []
  for step in sorted(ckpt.store.steps(), reverse=True):
    try:
      ckpt.verify(step)
      return (step, *ckpt.restore(step, state_template, best_template))
    except CheckpointCorrupt as e:
      tried.append(str(e))
      ckpt.quarantine(step, e)
  if tried:
    raise ckpt.no_intact_left(tried)
  return None


def _newest_verified(ckpt: Checkpointer, reopen: bool = True) -> tuple[int, list[str]]:
  """The newest checkpoint whose files match their manifest (or _NONE), damaged ones moved
  aside on the way; and what was wrong with those."""
  tried = []
  for step in sorted(ckpt.store.steps(), reverse=True):
    try:
      ckpt.verify(step)
      return step, tried
    except CheckpointCorrupt as e:
      tried.append(str(e))
      ckpt.quarantine(step, e, reopen=reopen)
  return _NONE, tried


def _restore_global_arrays(ckpt: Checkpointer, state_template: Any, best_template: Any
                           ) -> tuple[int, Any, Any, dict] | None:
  """Global arrays over several processes: each process reads its own shards, so they all
  restore together. Process 0 alone picks the step by the checksums, moving damaged
  checkpoints aside, and tells the others; every process then reopens its manager (its list
  of steps may have changed) and restores that step; all fail together if any fails."""
  def decide() -> int:
    step, tried = _newest_verified(ckpt, reopen=False)
    if step == _NONE and tried:
      raise ckpt.no_intact_left(tried)
    return step

  step = _step_from_main(ckpt.directory, decide)
  ckpt.store.reopen()
  if step == _NONE:
    return None
  return _restore_together(ckpt, step, state_template, best_template)


def _step_from_main(directory: str, decide: Callable[[], int]) -> int:
  """Process 0 runs `decide` (the checkpoint step to restore, or _NONE) and every process
  gets its answer; when it raises (process 0 refuses the checkpoints), the others raise a
  CheckpointError saying so."""
  if distributed.is_main():
    try:
      step = decide()
    except Exception:
      distributed.from_main(_REFUSED)
      raise
    return distributed.from_main(step)
  step = distributed.from_main(0)
  if step == _REFUSED:
    raise CheckpointError(f"process 0 refused the checkpoints in {directory} (its error says "
                          "why)")
  return step


def _restore_together(ckpt: Checkpointer, step: int, state_template: Any, best_template: Any,
                      restored: tuple | None = None) -> tuple[int, Any, Any, dict]:
  """Every process restores `step` (unless it already has: `restored`), then says whether
  that worked, so that all of them fail together rather than some waiting forever in the
  first step."""
  try:
    if restored is None:
      restored = (step, *ckpt.restore(step, state_template, best_template))
  except CheckpointError:
    distributed.failed_processes(True)
    raise
  failed = distributed.failed_processes(False)
  if failed:
    raise CheckpointError(f"process {failed[0]} could not restore checkpoint "
                          f"{os.path.join(ckpt.directory, str(step))} (its error says why)")
  return restored


def _restore_as_process_0_decides(ckpt: Checkpointer, state_template: Any, best_template: Any
                                  ) -> tuple[int, Any, Any, dict] | None:
  """Process 0 verifies the checkpoints, moves damaged ones aside and restores the newest
  intact one, then tells the others which (or none, or that it refused); they restore that
  step without checking or moving anything (two processes checking the same files, one of
  them moving them, would race). Then every process says whether its restore worked, so
  that all of them fail together rather than some waiting forever in the first step."""
  restored = None

  def decide() -> int:
    nonlocal restored
    restored = _restore_newest_intact(ckpt, state_template, best_template)
    return _NONE if restored is None else restored[0]

  step = _step_from_main(ckpt.directory, decide)
  if step == _NONE:
    return None
  if restored is None:
    logging.info("Restoring checkpoint %d, the one process 0 checked and restored", step)
  return _restore_together(ckpt, step, state_template, best_template, restored)
