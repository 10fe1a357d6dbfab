"""Orbax checkpoints of the run: train state, early-stopping weights and run bookkeeping.

Saves are synchronous and atomic (Orbax writes to a temporary folder and renames), so a run
killed at any moment leaves the previous checkpoint intact. After each save a SHA-256 manifest of
the checkpoint's files is written to `<workdir>/checksums/<step>.json`; `restore_latest` checks
it, and a checkpoint whose bytes changed (or that cannot be read) is moved to
`<workdir>/corrupt_checkpoints/` with a warning and the previous one is used. A checkpoint that
does not fit the config is an error, not a fallback. Failures are CheckpointErrors naming the
folder and what to do, not library tracebacks.

A checkpoint of model variables alone (`save_variables`, e.g. imported weights) has the same
items; its `state` is just {'params', 'batch_stats'}. `restore_variables` reads the weights of
either kind without an optimiser to restore into; `restore` fills the rest of a train state
from its template (a run started on such a workdir trains from those weights).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from typing import Any, Iterator

from absl import logging

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from fastadv_jax import distributed, workdir


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used (corrupt, or written by an incompatible config)."""


# meta key of a checkpoint whose `state` item holds the model variables alone
VARIABLES_ONLY = "variables_only"
_VARIABLE_KEYS = ("params", "batch_stats")


def _to_numpy_tree(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def _state_dict(tree: Any) -> Any:
  return _to_numpy_tree(flax.serialization.to_state_dict(tree))


def _abstract(state_dict: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state_dict)


class CheckpointCorrupt(CheckpointError):
  """A checkpoint's bytes differ from its manifest, or it cannot be read at all."""


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


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` with items state / best / meta."""

  def __init__(self, workdir: str, max_to_keep: int = 2, read_only: bool = False):
    """`read_only`: a reader of another run's checkpoints (evaluate, export) creates, deletes
    and cleans up nothing: Orbax's clean-up of temporary folders would otherwise remove the
    checkpoint a running training is writing, and runs in a thread that a reader ending early
    (an error) cuts off with a traceback."""
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.checksums = os.path.join(self.workdir, "checksums")
    self.max_to_keep = max_to_keep
    self.read_only = read_only
    self._open()

  def _open(self) -> None:
    # Several processes (distributed.py): process 0 alone writes; every process reads the same
    # files, each through a manager of its own (no cross-process barriers inside Orbax).
    extra = {}
    if jax.process_count() > 1:
      extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
          primary_host=jax.process_index(), active_processes={jax.process_index()})
      if distributed.is_main():
        os.makedirs(self.directory, exist_ok=True)
    # (Orbax's own read_only option logs two warnings per reader; a reader never saves.)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if self.read_only else self.max_to_keep,
        create=jax.process_count() == 1 and not self.read_only,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=distributed.is_main() and not self.read_only, **extra)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "best", "meta"))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot open checkpoint folder {self.directory}: {e}") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, best: Any, meta: dict) -> None:
    """`state` and `best` are host pytrees (e.g. an unreplicated TrainState). With several
    processes only process 0 writes, and every process waits until it has."""
    if distributed.is_main():
      self._save(step, state, best, meta)
    distributed.barrier(f"checkpoint_{step}")

  def save_variables(self, step: int, variables: Any, meta: dict) -> None:
    """Checkpoints model variables ({'params', 'batch_stats'}) alone, as both the last and the
    early-stopped weights: weights that never trained here (an import) have no optimiser or
    method state, and none is made up for them."""
    self.save(step, variables, variables, {**meta, VARIABLES_ONLY: True})

  def _save(self, step: int, state: Any, best: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_dict(state)),
        best=ocp.args.StandardSave(_state_dict(best)),
        meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()
    os.makedirs(self.checksums, exist_ok=True)
    workdir.write_json(os.path.join(self.checksums, f"{step}.json"),
                       _digest(os.path.join(self.directory, str(step))))
    kept = {f"{s}.json" for s in self.manager.all_steps()}
    for name in os.listdir(self.checksums):  # manifests of checkpoints Orbax has rotated out
      if name.endswith(".json") and name not in kept:
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

  def restore_latest(self, state_template: Any, best_template: Any
                     ) -> tuple[int, Any, Any, dict] | None:
    """The newest intact checkpoint as (step, state, best, meta), or None if there is none.

    Corrupt checkpoints are moved aside with a warning and the previous one is tried; a
    checkpoint that does not fit the templates (another config) raises CheckpointError.
    """
    tried = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        self.verify(step)
        return (step, *self.restore(step, state_template, best_template))
      except CheckpointCorrupt as e:
        tried.append(str(e))
        if distributed.is_main():
          self._quarantine(step, e)
    if tried:
      raise CheckpointError(f"no intact checkpoint left in {self.directory}; it could not be "
                            f"restored: {tried[0]}. The damaged ones are in "
                            f"{os.path.join(self.workdir, 'corrupt_checkpoints')}. Use a fresh "
                            f"--workdir, or delete {self.directory} to start over.")
    return None

  def _quarantine(self, step: int, why: Exception) -> None:
    dest = os.path.join(self.workdir, "corrupt_checkpoints", f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), dest)
    manifest = os.path.join(self.checksums, f"{step}.json")
    if os.path.exists(manifest):
      shutil.move(manifest, os.path.join(dest, "checksums.json"))
    logging.warning("%s. Moved it to %s; falling back to the previous checkpoint.", why, dest)
    self.manager.close()
    self._open()

  @contextlib.contextmanager
  def _reading(self, step: int) -> Iterator[None]:
    """Turns what goes wrong while reading checkpoint `step` into a CheckpointError (does not
    fit the templates) or a CheckpointCorrupt (anything else), instead of a library traceback."""
    where = os.path.join(self.directory, str(step))
    try:
      yield
    except CheckpointError as e:
      raise CheckpointError(f"checkpoint {where} does not match this config: {e}. Use a fresh "
                            f"--workdir, or delete {self.directory} to start over.") from None
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise CheckpointCorrupt(
          f"checkpoint {where} could not be restored ({type(e).__name__}: {first}); it is corrupt "
          f"or was written by an incompatible version") from None

  def _variables_only(self, step: int) -> bool:
    """Whether checkpoint `step` was written by `save_variables` (its meta says so)."""
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return bool(dict(meta["meta"]).get(VARIABLES_ONLY, False))

  def restore(self, step: int, state_template: Any, best_template: Any
              ) -> tuple[Any, Any, dict]:
    """Restores into the structures of the templates; raises CheckpointError on any mismatch.
    A checkpoint of variables alone fills the template's params and batch_stats and keeps the
    rest of it (optimiser, step, method state) as it is."""
    with self._reading(step):
      state_sd = _state_dict(state_template)
      best_sd = _state_dict(best_template)
      variables_only = self._variables_only(step)
      saved_sd = ({k: state_sd[k] for k in _VARIABLE_KEYS if k in state_sd} if variables_only
                  else state_sd)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(saved_sd)),
            best=ocp.args.StandardRestore(_abstract(best_sd)),
            meta=ocp.args.JsonRestore()))
      except Exception:  # pylint: disable=broad-except
        # Entries the template has and the checkpoint lacks (e.g. a weight average that a run
        # without one never saved) make Orbax fail like damage would; they are another config,
        # not corruption, and the checkpoint must not be moved aside (nor the run restarted).
        self._check_saved_structure(step, saved_sd)
        raise
      _check_same_structure(saved_sd, restored["state"], "state")
      _check_same_structure(best_sd, restored["best"], "best")
      state = flax.serialization.from_state_dict(
          state_template,
          {**state_sd, **restored["state"]} if variables_only else restored["state"])
      best = flax.serialization.from_state_dict(best_template, restored["best"])
      meta = dict(restored["meta"])
    _check_finite(state, os.path.join(self.directory, str(step)))
    return state, best, meta

  def _check_saved_structure(self, step: int, state_sd: Any) -> None:
    """CheckpointError when the `state` saved at `step`, read as it was saved, has other
    entries or shapes than `state_sd`."""
    saved = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    _check_same_structure(state_sd, saved, "state")

  def restore_variables(self, step: int, template: Any, averaged: bool = False
                        ) -> tuple[Any, Any, dict]:
    """(last, best, meta) of checkpoint `step`, the weights as model variables shaped like
    `template` ({'params', 'batch_stats'}). Reads a training checkpoint and one of variables
    alone alike, so a reader of weights needs no optimiser to restore into; the rest of a
    training state is read but not kept. `averaged`: `last` is the train state's weight
    average instead (its BatchNorm statistics, or the raw ones where those are not averaged:
    weight_averaging.variables); CheckpointError if the checkpoint holds none."""
    with self._reading(step):
      sd = _state_dict(template)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(),  # whatever was saved: a train state or variables
          best=ocp.args.StandardRestore(_abstract(sd)),
          meta=ocp.args.JsonRestore()))
      last_sd = {k: dict(restored["state"]).get(k) for k in sd}
      if averaged:
        ema = dict(restored["state"]).get("ema")
        if not ema:
          raise CheckpointError("it holds no weight average (trained with config.ema_decay 0, "
                                "or weights imported without one)")
        last_sd = {"params": dict(ema)["params"],
                   "batch_stats": dict(ema).get("batch_stats", last_sd.get("batch_stats"))}
      _check_same_structure(sd, last_sd, "state")
      _check_same_structure(sd, restored["best"], "best")
      last = flax.serialization.from_state_dict(template, last_sd)
      best = flax.serialization.from_state_dict(template, restored["best"])
      meta = dict(restored["meta"])
    _check_finite(last, os.path.join(self.directory, str(step)))
    return last, best, meta

  def close(self) -> None:
    self.manager.close()


def _check_same_structure(expected: Any, got: Any, name: str) -> None:
  exp = jax.tree_util.tree_flatten_with_path(expected)[0]
  got_ = jax.tree_util.tree_flatten_with_path(got)[0]
  exp_d = {jax.tree_util.keystr(p): np.shape(v) for p, v in exp}
  got_d = {jax.tree_util.keystr(p): np.shape(v) for p, v in got_}
  if exp_d.keys() != got_d.keys():
    missing = sorted(exp_d.keys() - got_d.keys())[:3]
    extra = sorted(got_d.keys() - exp_d.keys())[:3]
    raise CheckpointError(f"{name}: missing entries {missing}, unexpected entries {extra}")
  for k, shape in exp_d.items():
    if tuple(got_d[k]) != tuple(shape):
      raise CheckpointError(f"{name}{k}: shape {tuple(got_d[k])} in checkpoint, {tuple(shape)} "
                            "expected")


def _check_finite(state: Any, where: str) -> None:
  """A saved state is always finite (the NaN stop never saves one): NaN here means damage."""
  for leaf in jax.tree.leaves(state):
    a = np.asarray(leaf)
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
      raise CheckpointCorrupt(f"checkpoint {where} holds non-finite values")
