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


def check_has_checkpoint(workdir_: str) -> None:
  """CheckpointError, without opening Orbax, if the workdir holds no finished checkpoint: a
  reader checks this before any work (loading data) and before it writes anything."""
  folder = os.path.join(workdir_, "checkpoints")
  if not os.path.isdir(folder):
    raise checkpointing.CheckpointError(f"no checkpoint in {workdir_}: has the run started?")
  if not any(name.isdigit() for name in os.listdir(folder)):  # finished saves are named <step>
    raise checkpointing.CheckpointError(
        f"no checkpoint in {folder}: the run stopped before its first one "
        "(config.checkpoint_every); run its training command again to resume it")


def load_run(workdir_: str, weights: str = "last",
             config: ml_collections.ConfigDict | None = None
             ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, evaluation variables, iteration) of a run's latest checkpoint (a training one or
  an import's, of variables alone): read as model variables, with no optimiser to build."""
  config = run_config(workdir_) if config is None else config
  check_has_checkpoint(workdir_)
  ckpt = checkpointing.Checkpointer(workdir_, read_only=True)
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
    _check_has_best(meta, workdir_, step)
    return config, best, int(meta["best_step"])
  return config, last, step


def _check_has_best(meta: dict, workdir_: str, step: int) -> None:
  """CheckpointError when the checkpoint has no early-stopped weights yet: a training run
  records them at its first diagnostics (monitoring.Monitor.run sets best_train_pgd >= 0 and
  best_step); until then its `best` item holds the initial weights, which must not be evaluated
  as "best". An import's weights are its best ones by definition (checkpointing.VARIABLES_ONLY)."""
  if meta.get(checkpointing.VARIABLES_ONLY) or float(meta.get("best_train_pgd", 0.0)) >= 0.0:
    return
  raise checkpointing.CheckpointError(
      f"--weights=best: {workdir_} has no early-stopped weights yet: its checkpoint (iteration "
      f"{step}) was saved before the run's first diagnostics (config.eval_every); use "
      "--weights=last, or resume the run")


def variables_template(config: ml_collections.ConfigDict) -> dict:
  """Freshly initialised float32 variables of config.model, {'params', 'batch_stats'} as a
  train state holds them (batch_stats empty without BatchNorm): the structure and shapes a
  checkpoint's weights must have to fit the config."""
  model = models.create_model(config, datasets.NUM_CLASSES[config.dataset], half_precision=False)
  shape = (1,) + tuple(datasets.IMAGE_SHAPES[config.dataset])
  v = model.init(jax.random.key(0), np.zeros(shape, np.float32), train=False)
  return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
