"""One checkpoint folder read and written through Orbax: a step's items, checked on the way in.

Each checkpoint holds three items: `state` (the train state, or model variables alone), `best`
(the early-stopping weights) and `meta` (the run's bookkeeping as JSON). Everything that goes
wrong while reading a step becomes a CheckpointMismatch (intact, but another config's entries or
shapes) or a CheckpointCorrupt (anything else), never a library traceback. Which step a run
resumes from, and what several processes agree on, is checkpointing.py's job.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fastadv_jax.runtime import distributed


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used (corrupt, or written by an incompatible config)."""


class CheckpointMismatch(CheckpointError):
  """A checkpoint that is intact but holds other entries or shapes than this config's state
  (the trainer then says what it was written with: workdir.mismatch_cause)."""


class CheckpointCorrupt(CheckpointError):
  """A checkpoint's bytes differ from its manifest, or it cannot be read at all."""


# meta key of a checkpoint whose `state` item holds the model variables alone
VARIABLES_ONLY = "variables_only"
_VARIABLE_KEYS = ("params", "batch_stats")


def state_dict(tree: Any) -> Any:
  """The tree's state dict as host (numpy) arrays."""
  return jax.tree.map(np.asarray, flax.serialization.to_state_dict(tree))


def _abstract(sd: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, sd)


class CheckpointStore:
  """An Orbax CheckpointManager over `directory` with the items state / best / meta."""

  def __init__(self, directory: str, max_to_keep: int, read_only: bool, global_arrays: bool):
    self.directory, self.max_to_keep = directory, max_to_keep
    self.read_only, self.global_arrays = read_only, global_arrays
    self.open()

  def open(self, first: bool = True) -> None:
    """Opens the manager (again after a checkpoint was moved aside: its list of steps changed).
    Several processes (distributed.py): process 0 alone writes host data; every process reads
    the same files, each through a manager of its own (no cross-process barriers inside
    Orbax)."""
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

  def reopen(self) -> None:
    self.manager.close()
    self.open(first=False)

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def state_sd(self, state: Any) -> Any:
    """The state's dict as saved: host arrays, or the global arrays themselves."""
    if self.global_arrays:
      return flax.serialization.to_state_dict(state)
    return state_dict(state)

  def write(self, step: int, state: Any, best: Any, meta: dict) -> None:
    """Writes checkpoint `step` and waits until it is complete (Orbax writes to a temporary
    folder and renames: a kill at any moment leaves the previous checkpoint intact)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(self.state_sd(state)),
        best=ocp.args.StandardSave(state_dict(best)), meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with checkpoint `step` (what the trainer passed to `save`)."""
    return dict(self.manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore(self, step: int, state_template: Any, best_template: Any
              ) -> tuple[Any, Any, dict]:
    """Restores into the structures of the templates; raises CheckpointError on any mismatch.
    A checkpoint of variables alone fills the template's params and batch_stats and keeps the
    rest of it (optimiser, step, method state) as it is."""
    with _reading(self._where(step)):
      state_sd, best_sd = self.state_sd(state_template), state_dict(best_template)
      variables_only = bool(self.meta(step).get(VARIABLES_ONLY, False))
      saved_sd = ({k: state_sd[k] for k in _VARIABLE_KEYS if k in state_sd} if variables_only
                  else state_sd)
      # Shapes first, from the metadata: a restore that fails midway leaves Orbax's readers
      # running, and they print tracebacks at exit.
      check_same_structure(saved_sd, _saved_tree(self._where(step)), "state")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(saved_sd)),
            best=ocp.args.StandardRestore(_abstract(best_sd)),
            meta=ocp.args.JsonRestore()))
      except Exception:  # pylint: disable=broad-except
        # Entries the template has and the checkpoint lacks (e.g. a weight average that a run
        # without one never saved) make Orbax fail like damage would; they are another config,
        # not corruption, and the checkpoint must not be moved aside (nor the run restarted).
        check_same_structure(saved_sd, self._state_as_saved(step), "state")
        raise
      check_same_structure(saved_sd, restored["state"], "state")
      check_same_structure(best_sd, restored["best"], "best")
      state = flax.serialization.from_state_dict(
          state_template,
          {**state_sd, **restored["state"]} if variables_only else restored["state"])
      best = flax.serialization.from_state_dict(best_template, restored["best"])
      meta = dict(restored["meta"])
    check_finite(state, self._where(step))
    return state, best, meta

  def restore_variables(self, step: int, template: Any, averaged: bool = False
                        ) -> tuple[Any, Any, dict]:
    """(last, best, meta) of checkpoint `step`, the weights as model variables shaped like
    `template` ({'params', 'batch_stats'}). Reads a training checkpoint and one of variables
    alone alike, so a reader of weights needs no optimiser to restore into; the rest of a
    training state is read but not kept. `averaged`: `last` is the train state's weight
    average instead (its BatchNorm statistics, or the raw ones where those are not averaged:
    weight_averaging.variables); CheckpointError if the checkpoint holds none."""
    with _reading(self._where(step)):
      sd = state_dict(template)
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=_restore_as_saved(self._where(step)),  # whatever was saved
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
      check_same_structure(sd, last_sd, "state")
      check_same_structure(sd, restored["best"], "best")
      last = flax.serialization.from_state_dict(template, last_sd)
      best = flax.serialization.from_state_dict(template, restored["best"])
      meta = dict(restored["meta"])
    check_finite(last, self._where(step))
    return last, best, meta

  def close(self) -> None:
    self.manager.close()

  def _where(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _state_as_saved(self, step: int) -> Any:
    """The `state` saved at `step`, read as it was saved, whatever it holds."""
    return self.manager.restore(step, args=ocp.args.Composite(
        state=_restore_as_saved(self._where(step))))["state"]


@contextlib.contextmanager
def _reading(where: str) -> Iterator[None]:
  """Turns what goes wrong while reading checkpoint `where` into a CheckpointMismatch (does not
  fit the templates) or a CheckpointCorrupt (anything else), instead of a library traceback."""
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


def _saved_tree(where: str) -> Any:
  """The metadata (shape, dtype, sharding) of every array of the `state` saved in `where`. A
  folder without it (an interrupted copy, an empty folder) is an error here, before Orbax logs a
  warning of its own about it and returns nothing."""
  if not os.path.isdir(os.path.join(where, "state")):
    raise FileNotFoundError(f"no state item in {where}")
  return ocp.StandardCheckpointer().metadata(os.path.join(where, "state")).item_metadata.tree


def _restore_as_saved(where: str) -> Any:
  """Restore args for the `state` saved in `where`, whatever it holds, as host arrays. A
  state saved as global arrays (the shard_map engine) records the devices it was spread
  over, and Orbax refuses to restore it without a target on another topology (one process
  reading a pod's checkpoint): there the target is host arrays shaped from its metadata."""
  tree = _saved_tree(where)
  if not any(getattr(m, "sharding", None) is not None for m in jax.tree.leaves(tree)):
    return ocp.args.StandardRestore()  # host arrays were saved: read them as they are
  return ocp.args.StandardRestore(jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree))


def check_same_structure(expected: Any, got: Any, name: str) -> None:
  """CheckpointError naming the first entry whose path or shape differs."""
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


def check_finite(state: Any, where: str) -> None:
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
