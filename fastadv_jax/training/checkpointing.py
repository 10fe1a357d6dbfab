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

import contextlib
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator

from absl import logging

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fastadv_jax.runtime import distributed
from fastadv_jax.training import workdir


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


# What process 0 tells the others when it restores no checkpoint (`_NONE`) or refuses them.
_NONE, _REFUSED = -1, -2


class CheckpointMismatch(CheckpointError):
  """A checkpoint that is intact but holds other entries or shapes than this config's state
  (the trainer then says what it was written with: workdir.mismatch_cause)."""


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
    self.checksums = os.path.join(self.workdir, "checksums")
    self.max_to_keep = max_to_keep
    self.read_only = read_only
    self._open()

  def _open(self, first: bool = True) -> None:
    # Several processes (distributed.py): process 0 alone writes; every process reads the same
    # files, each through a manager of its own (no cross-process barriers inside Orbax).
    extra = {}
    if jax.process_count() > 1 and self.global_arrays:  # every process saves its shards
      if distributed.is_main():
        os.makedirs(self.directory, exist_ok=True)
      if first:
        distributed.barrier("checkpoint_folder")
    elif jax.process_count() > 1:
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
    """`best` is a host pytree; `state` too (e.g. an unreplicated TrainState) unless
    `global_arrays`, where it is the global arrays. With several processes only process 0
    writes host data, and every process waits until the checkpoint is complete."""
    if self.global_arrays and jax.process_count() > 1:
      self.manager.save(step, args=self._save_args(state, best, meta))
      self.manager.wait_until_finished()
      distributed.barrier(f"checkpoint_shards_{step}")
      if distributed.is_main():
        self._write_manifest(step)
    elif distributed.is_main():
      self._save(step, state, best, meta)
    distributed.barrier(f"checkpoint_{step}")

  def save_variables(self, step: int, variables: Any, meta: dict) -> None:
    """Checkpoints model variables ({'params', 'batch_stats'}) alone, as both the last and the
    early-stopped weights: weights that never trained here (an import) have no optimiser or
    method state, and none is made up for them."""
    self.save(step, variables, variables, {**meta, VARIABLES_ONLY: True})

  def _state_sd(self, state: Any) -> Any:
    """The state's dict as saved: host arrays, or the global arrays themselves."""
    if self.global_arrays:
      return flax.serialization.to_state_dict(state)
    return _state_dict(state)

  def _save_args(self, state: Any, best: Any, meta: dict) -> Any:
    return ocp.args.Composite(state=ocp.args.StandardSave(self._state_sd(state)),
                              best=ocp.args.StandardSave(_state_dict(best)),
                              meta=ocp.args.JsonSave(meta))

  def _save(self, step: int, state: Any, best: Any, meta: dict) -> None:
    self.manager.save(step, args=self._save_args(state, best, meta))
    self.manager.wait_until_finished()
    self._write_manifest(step)

  def _write_manifest(self, step: int) -> None:
    """The SHA-256 manifest of checkpoint `step`; those of rotated-out checkpoints go."""
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
    Several processes: process 0 alone decides (`_restore_as_process_0_decides`).
    """
    if jax.process_count() > 1 and self.global_arrays:
      return self._restore_global_arrays(state_template, best_template)
    if jax.process_count() > 1:
      return self._restore_as_process_0_decides(state_template, best_template)
    return self._restore_newest_intact(state_template, best_template)

  def _newest_verified(self, reopen: bool = True) -> tuple[int, list[str]]:
    """The newest checkpoint whose files match their manifest (or _NONE), damaged ones moved
    aside on the way; and what was wrong with those."""
    tried = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        self.verify(step)
        return step, tried
      except CheckpointCorrupt as e:
        tried.append(str(e))
        self._quarantine(step, e, reopen=reopen)
    return _NONE, tried

  def _no_intact_left(self, tried: list[str]) -> CheckpointError:
    return CheckpointError(f"no intact checkpoint left in {self.directory}; it could not be "
                           f"restored: {tried[0]}. The damaged ones are in "
                           f"{os.path.join(self.workdir, 'corrupt_checkpoints')}. To train "
                           "again from the start, use a new --workdir")

  def _restore_global_arrays(self, state_template: Any, best_template: Any
                             ) -> tuple[int, Any, Any, dict] | None:
    """Global arrays over several processes: each process reads its own shards, so they all
    restore together. Process 0 alone picks the step by the checksums, moving damaged
    checkpoints aside, and tells the others; every process then reopens its manager (its list
    of steps may have changed) and restores that step; all fail together if any fails."""
    def decide() -> int:
      step, tried = self._newest_verified(reopen=False)
      if step == _NONE and tried:
        raise self._no_intact_left(tried)
      return step

    step = self._step_from_main(decide)
    self.manager.close()
    self._open(first=False)
    if step == _NONE:
      return None
    return self._restore_together(step, state_template, best_template)

  def _step_from_main(self, decide: Callable[[], int]) -> int:
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
      raise CheckpointError(f"process 0 refused the checkpoints in {self.directory} (its "
                            "error says why)")
    return step

  def _restore_together(self, step: int, state_template: Any, best_template: Any,
                        restored: tuple | None = None) -> tuple[int, Any, Any, dict]:
    """Every process restores `step` (unless it already has: `restored`), then says whether
    that worked, so that all of them fail together rather than some waiting forever in the
    first step."""
    try:
      if restored is None:
        restored = (step, *self.restore(step, state_template, best_template))
    except CheckpointError:
      distributed.failed_processes(True)
      raise
    failed = distributed.failed_processes(False)
    if failed:
      raise CheckpointError(f"process {failed[0]} could not restore checkpoint "
                            f"{os.path.join(self.directory, str(step))} (its error says why)")
    return restored

  def _restore_newest_intact(self, state_template: Any, best_template: Any
                             ) -> tuple[int, Any, Any, dict] | None:
    tried = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        self.verify(step)
        return (step, *self.restore(step, state_template, best_template))
      except CheckpointCorrupt as e:
        tried.append(str(e))
        self._quarantine(step, e)
    if tried:
      raise self._no_intact_left(tried)
    return None

  def _restore_as_process_0_decides(self, state_template: Any, best_template: Any
                                    ) -> tuple[int, Any, Any, dict] | None:
    """Process 0 verifies the checkpoints, moves damaged ones aside and restores the newest
    intact one, then tells the others which (or none, or that it refused); they restore that
    step without checking or moving anything (two processes checking the same files, one of
    them moving them, would race). Then every process says whether its restore worked, so
    that all of them fail together rather than some waiting forever in the first step."""
    restored = None

    def decide() -> int:
      nonlocal restored
      restored = self._restore_newest_intact(state_template, best_template)
      return _NONE if restored is None else restored[0]

    step = self._step_from_main(decide)
    if step == _NONE:
      return None
    if restored is None:
      logging.info("Restoring checkpoint %d, the one process 0 checked and restored", step)
    return self._restore_together(step, state_template, best_template, restored)

  def _quarantine(self, step: int, why: Exception, reopen: bool = True) -> None:
    dest = os.path.join(self.workdir, "corrupt_checkpoints", f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), dest)
    manifest = os.path.join(self.checksums, f"{step}.json")
    if os.path.exists(manifest):
      shutil.move(manifest, os.path.join(dest, "checksums.json"))
    logging.warning("%s. Moved it to %s; falling back to the previous checkpoint.", why, dest)
    if reopen:
      self.manager.close()
      self._open(first=False)

  @contextlib.contextmanager
  def _reading(self, step: int) -> Iterator[None]:
    """Turns what goes wrong while reading checkpoint `step` into a CheckpointError (does not
    fit the templates) or a CheckpointCorrupt (anything else), instead of a library traceback."""
    where = os.path.join(self.directory, str(step))
    try:
      yield
    except CheckpointError as e:
      raise CheckpointMismatch(f"checkpoint {where} does not fit this config ({e}); the "
                               "checkpoint is kept") from None
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise CheckpointCorrupt(
          f"checkpoint {where} could not be restored ({type(e).__name__}: {first}); it is corrupt "
          f"or was written by an incompatible version") from None

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with checkpoint `step` (what the trainer passed to `save`)."""
    return dict(self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def _variables_only(self, step: int) -> bool:
    """Whether checkpoint `step` was written by `save_variables` (its meta says so)."""
    return bool(self.meta(step).get(VARIABLES_ONLY, False))

  def restore(self, step: int, state_template: Any, best_template: Any
              ) -> tuple[Any, Any, dict]:
    """Restores into the structures of the templates; raises CheckpointError on any mismatch.
    A checkpoint of variables alone fills the template's params and batch_stats and keeps the
    rest of it (optimiser, step, method state) as it is."""
    with self._reading(step):
      state_sd = self._state_sd(state_template)
      best_sd = _state_dict(best_template)
      variables_only = self._variables_only(step)
      saved_sd = ({k: state_sd[k] for k in _VARIABLE_KEYS if k in state_sd} if variables_only
                  else state_sd)
      # Shapes first, from the metadata: a restore that fails midway leaves Orbax's readers
      # running, and they print tracebacks at exit.
      _check_same_structure(saved_sd, self._saved_tree(step), "state")
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
        state=self._restore_as_saved(step)))["state"]
    _check_same_structure(state_sd, saved, "state")

  def _saved_tree(self, step: int) -> Any:
    """The metadata (shape, dtype, sharding) of every array of the `state` saved at `step`."""
    path = os.path.join(self.directory, str(step), "state")
    return ocp.StandardCheckpointer().metadata(path).item_metadata.tree

  def _restore_as_saved(self, step: int) -> Any:
    """Restore args for the `state` saved at `step`, whatever it holds, as host arrays. A
    state saved as global arrays (the shard_map engine) records the devices it was spread
    over, and Orbax refuses to restore it without a target on another topology (one process
    reading a pod's checkpoint): there the target is host arrays shaped from its metadata."""
    tree = self._saved_tree(step)
    if not any(getattr(m, "sharding", None) is not None for m in jax.tree.leaves(tree)):
      return ocp.args.StandardRestore()  # host arrays were saved: read them as they are
    return ocp.args.StandardRestore(jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))

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
          state=self._restore_as_saved(step),  # whatever was saved: a state or variables
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
  """A saved state is always finite (the NaN stop never saves one): NaN here means damage.
  Arrays spread over processes are checked where their shards are, and every process gets
  the verdict."""
  leaves = [v for v in jax.tree.leaves(state) if np.dtype(v.dtype).kind == "f"]
  spread = lambda v: isinstance(v, jax.Array) and not v.is_fully_addressable  # noqa: E731
  host = [np.asarray(v) for v in leaves if not spread(v)]
  placed = [v for v in leaves if spread(v)]
  finite = all(np.all(np.isfinite(a)) for a in host)
  if placed:
    finite &= bool(np.asarray(jax.jit(
        lambda vs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in vs])))(placed)))
  if not finite:
    raise CheckpointCorrupt(f"checkpoint {where} holds non-finite values")
