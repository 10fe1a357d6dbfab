"""A run's model from its config: `config.model` names the record and `config.model_args.<model>`
holds its hyperparameters, checked by the record's own args type (run_plan.py resolves both).

The library's `models.create_model` takes plain arguments; this is the one place that reads the
config's model fields for it (the trainer, the evaluator, the command lines and the benchmark).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections

from fastadv_jax import models
from fastadv_jax.training import run_plan


def model_args(config: ml_collections.ConfigDict) -> Any:
  """The args record of `config.model` from `config.model_args.<model>` (defaults where a field
  or the section is absent). ValueError for an unknown model; registry.ArgError for a bad field."""
  return run_plan.model_args(config, models.get(config.model))


def create_model(config: ml_collections.ConfigDict | run_plan.RunPlan, num_classes: int,
                 bn_axis_name: str | None = None, half_precision: bool | None = None) -> nn.Module:
  """`models.create_model` for the config's model, args, precision (`half_precision` overrides
  it) and input normalisation (`input_mean` / `input_std`); a RunPlan's resolved ones."""
  if isinstance(config, run_plan.RunPlan):
    model, args, config = config.model, config.model_args, config.config
  else:
    model, args = run_plan.resolve_model(config)
  return models.create_model(
      model, num_classes, args=args,
      half_precision=config.half_precision if half_precision is None else half_precision,
      input_mean=tuple(config.input_mean), input_std=tuple(config.input_std),
      bn_axis_name=bn_axis_name)
