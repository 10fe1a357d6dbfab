"""Orbax checkpoints of the run: train state, early-stopping weights and run bookkeeping.

Saves are synchronous and atomic (Orbax writes to a temporary folder and renames), so a run
killed at any moment leaves the previous checkpoint intact. Any failure to restore is reported
as a CheckpointError naming the folder and what to do, not as a library traceback.
"""
from __future__ import annotations

import os
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used (corrupt, or written by an incompatible config)."""


def _to_numpy_tree(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


class Checkpointer:
  """CheckpointManager over `<workdir>/checkpoints` with items state / best / meta."""

  def __init__(self, workdir: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False,
                                           cleanup_tmp_directories=True)
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "best", "meta"))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot open checkpoint folder {self.directory}: {e}") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, best: Any, meta: dict) -> None:
    """`state` and `best` are host pytrees (e.g. an unreplicated TrainState)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_numpy_tree(flax.serialization.to_state_dict(state))),
        best=ocp.args.StandardSave(_to_numpy_tree(flax.serialization.to_state_dict(best))),
        meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()

  def restore(self, step: int, state_template: Any, best_template: Any
              ) -> tuple[Any, Any, dict]:
    """Restores into the structures of the templates; raises CheckpointError on any mismatch."""
    where = os.path.join(self.directory, str(step))
    try:
      state_sd = _to_numpy_tree(flax.serialization.to_state_dict(state_template))
      best_sd = _to_numpy_tree(flax.serialization.to_state_dict(best_template))
      abstract = lambda t: jax.tree.map(ocp.utils.to_shape_dtype_struct, t)  # noqa: E731
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract(state_sd)),
          best=ocp.args.StandardRestore(abstract(best_sd)),
          meta=ocp.args.JsonRestore()))
      _check_same_structure(state_sd, restored["state"], "state")
      _check_same_structure(best_sd, restored["best"], "best")
      state = flax.serialization.from_state_dict(state_template, restored["state"])
      best = flax.serialization.from_state_dict(best_template, restored["best"])
      meta = dict(restored["meta"])
    except CheckpointError as e:
      raise CheckpointError(f"checkpoint {where} does not match this config: {e}. Use a fresh "
                            f"--workdir, or delete {self.directory} to start over.") from None
    except Exception as e:  # pylint: disable=broad-except
      first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
      raise CheckpointError(
          f"checkpoint {where} could not be restored ({type(e).__name__}: {first}); it is corrupt "
          f"or was written by an incompatible config or version. Use a fresh --workdir, or "
          f"delete {where} to resume from an earlier checkpoint.") from None
    return state, best, meta

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
