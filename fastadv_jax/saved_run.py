"""A finished or running training workdir, read back: its config and its latest weights."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from fastadv_jax import checkpointing, datasets, models, workdir


def run_config(workdir_: str) -> ml_collections.ConfigDict:
  """The config.json of a training workdir, its `plugins` imported; CheckpointError if there
  is none or a plugin cannot be imported."""
  config = workdir.read_config(workdir_)
  if config is None:
    raise checkpointing.CheckpointError(
        f"{os.path.join(workdir_, 'config.json')} not found: is {workdir_} a training workdir?")
  # The run's plugins register its model (and method) again here, before anything reads the
  # registries: the model's XLA flags, its build, its PyTorch layout.
  from fastadv_jax import plugins  # pylint: disable=import-outside-toplevel
  try:
    plugins.load(config.get("plugins", ""))
  except plugins.PluginError as e:
    raise checkpointing.CheckpointError(
        f"{os.path.join(workdir_, 'config.json')}: config.plugins: {e}") from None
  return config


def load_run(workdir_: str, weights: str = "last",
             config: ml_collections.ConfigDict | None = None
             ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, evaluation variables, iteration) of a run's latest checkpoint (a training one or
  an import's, of variables alone): read as model variables, with no optimiser to build."""
  config = run_config(workdir_) if config is None else config
  if not os.path.isdir(os.path.join(workdir_, "checkpoints")):
    raise checkpointing.CheckpointError(f"no checkpoint in {workdir_}: has the run started?")
  ckpt = checkpointing.Checkpointer(workdir_)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise checkpointing.CheckpointError(f"no checkpoint in {ckpt.directory}")
    template = variables_template(config)
    ckpt.verify(step)
    last, best, meta = ckpt.restore_variables(step, template)
  finally:
    ckpt.close()
  if weights == "best":
    return config, best, int(meta["best_step"])
  return config, last, step


def variables_template(config: ml_collections.ConfigDict) -> dict:
  """Freshly initialised float32 variables of config.model, {'params', 'batch_stats'} as a
  train state holds them (batch_stats empty without BatchNorm): the structure and shapes a
  checkpoint's weights must have to fit the config."""
  model = models.create_model(config, datasets.NUM_CLASSES[config.dataset], half_precision=False)
  shape = (1,) + tuple(datasets.IMAGE_SHAPES[config.dataset])
  v = model.init(jax.random.key(0), np.zeros(shape, np.float32), train=False)
  return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
