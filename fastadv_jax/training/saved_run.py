"""A finished or running training workdir, read back: its config and its latest weights."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from fastadv_jax.data import datasets
from fastadv_jax.runtime import plugins
from fastadv_jax.training import checkpointing, model_config, workdir


def run_config(workdir_: str) -> ml_collections.ConfigDict:
  """The config.json of a training workdir, its `plugins` imported; CheckpointError if there
  is none or a plugin cannot be imported."""
  config = workdir.read_config(workdir_)
  if config is None:
    raise checkpointing.CheckpointError(
        f"{os.path.join(workdir_, 'config.json')} not found: is {workdir_} a training workdir?")
  # The run's plugins register its model (and method) again here, before anything reads the
  # registries: the model's XLA flags, its build, its PyTorch layout.
  try:
    plugins.load(config.plugins)
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
  if not workdir.has_checkpoint(workdir_):
    raise checkpointing.CheckpointError(
        f"no checkpoint in {folder}: the run stopped before its first one "
        "(config.checkpoint_every); run its training command again to resume it")


# What `load_run(weights=...)` (and --weights of evaluate and torch_export) can read.
WEIGHTS = ("last", "best", "averaged", "selected")


def load_run(workdir_: str, weights: str = "last",
             config: ml_collections.ConfigDict | None = None
             ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, evaluation variables, iteration) of a run's latest checkpoint (a training one or
  an import's, of variables alone): read as model variables, with no optimiser to build.

  weights: "last"; "best", the early-stopped ones (config.selection "early_stopping");
  "selected", those chosen on the validation split (config.selection "validation"), raw or
  averaged; "averaged", the last weight average (config.ema_decay > 0). Asking for weights the
  run does not keep is a one-line CheckpointError, before the checkpoint is read."""
  config = run_config(workdir_) if config is None else config
  check_keeps(config, weights, workdir_)
  check_has_checkpoint(workdir_)
  ckpt = checkpointing.Checkpointer(workdir_, read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise checkpointing.CheckpointError(f"no checkpoint in {ckpt.directory}")
    template = variables_template(config)
    ckpt.verify(step)
    try:
      last, best, meta = ckpt.restore_variables(step, template,
                                                averaged=weights == "averaged")
    except checkpointing.CheckpointError as e:
      if weights != "averaged" or isinstance(e, checkpointing.CheckpointCorrupt):
        raise
      raise checkpointing.CheckpointError(
          f"--weights=averaged: the checkpoint of {workdir_} (iteration {step}): {e}") from None
  finally:
    ckpt.close()
  if weights in ("best", "selected"):
    _check_has_best(meta, workdir_, step, weights)
    return config, best, int(meta["best_step"])
  return config, last, step


def check_keeps(config: ml_collections.ConfigDict, weights: str, workdir_: str) -> None:
  """CheckpointError when the run's config keeps no such weights."""
  if weights not in WEIGHTS:
    raise ValueError(f"weights: {weights!r} is not one of {WEIGHTS}")
  validation = config.selection == "validation"
  if weights == "averaged" and float(config.ema_decay) <= 0:
    raise checkpointing.CheckpointError(
        f"--weights=averaged: {workdir_} has no weight average (config.ema_decay is 0); use "
        "--weights=last or --weights=best")
  if weights == "selected" and not validation:
    raise checkpointing.CheckpointError(
        f"--weights=selected: {workdir_} selects no weights on a validation split "
        "(config.selection is 'early_stopping'); its early-stopped ones are --weights=best")
  if weights == "best" and validation:
    raise checkpointing.CheckpointError(
        f"--weights=best: {workdir_} keeps the weights selected on its validation split "
        "(config.selection 'validation'), not early-stopped ones: use --weights=selected")


def _check_has_best(meta: dict, workdir_: str, step: int, weights: str = "best") -> None:
  """CheckpointError when the checkpoint has no early-stopped (or selected) weights yet: a
  training run records them at its first diagnostics (monitoring.Monitor.run sets
  best_train_pgd, or best_val_pgd, >= 0 and best_step); until then its `best` item holds the
  initial weights, which must not be evaluated as "best". An import's weights are its best ones
  by definition (checkpointing.VARIABLES_ONLY)."""
  key = "best_val_pgd" if weights == "selected" else "best_train_pgd"
  if meta.get(checkpointing.VARIABLES_ONLY) or float(meta.get(key, 0.0)) >= 0.0:
    return
  kind = "selected" if weights == "selected" else "early-stopped"
  raise checkpointing.CheckpointError(
      f"--weights={weights}: {workdir_} has no {kind} weights yet: its checkpoint (iteration "
      f"{step}) was saved before the run's first diagnostics (config.eval_every); use "
      "--weights=last, or resume the run")


def variables_template(config: ml_collections.ConfigDict) -> dict:
  """Freshly initialised float32 variables of config.model, {'params', 'batch_stats'} as a
  train state holds them (batch_stats empty without BatchNorm): the structure and shapes a
  checkpoint's weights must have to fit the config."""
  model = model_config.create_model(config, datasets.NUM_CLASSES[config.dataset],
                                    half_precision=False)
  shape = (1,) + tuple(datasets.IMAGE_SHAPES[config.dataset])
  v = model.init(jax.random.key(0), np.zeros(shape, np.float32), train=False)
  return {"params": v["params"], "batch_stats": v.get("batch_stats", {})}
