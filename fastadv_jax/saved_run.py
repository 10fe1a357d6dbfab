"""A finished or running training workdir, read back: its config and its latest weights."""
from __future__ import annotations

import os

import jax
import ml_collections

from fastadv_jax import checkpointing, datasets, models, workdir
from fastadv_jax import train_state as ts


def run_config(workdir_: str) -> ml_collections.ConfigDict:
  """The config.json of a training workdir; CheckpointError if there is none."""
  config = workdir.read_config(workdir_)
  if config is None:
    raise checkpointing.CheckpointError(
        f"{os.path.join(workdir_, 'config.json')} not found: is {workdir_} a training workdir?")
  return config


def load_run(workdir_: str, weights: str = "last",
             config: ml_collections.ConfigDict | None = None
             ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, evaluation variables, iteration) of a run's latest checkpoint."""
  config = run_config(workdir_) if config is None else config
  if not os.path.isdir(os.path.join(workdir_, "checkpoints")):
    raise checkpointing.CheckpointError(f"no checkpoint in {workdir_}: has the run started?")
  ckpt = checkpointing.Checkpointer(workdir_)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise checkpointing.CheckpointError(f"no checkpoint in {ckpt.directory}")
    model = models.create_model(config, datasets.NUM_CLASSES[config.dataset],
                                half_precision=False)
    state = ts.create_train_state(config, model, jax.random.key(0),
                                  datasets.IMAGE_SHAPES[config.dataset], 1)
    ckpt.verify(step)
    state, best, meta = ckpt.restore(step, state, ts.variables(state))
  finally:
    ckpt.close()
  if weights == "best":
    return config, best, int(meta["best_step"])
  return config, ts.variables(state), step
