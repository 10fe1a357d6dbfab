"""A run's model from its config: `config.model` names the record (models.get) and
`config.model_args.<model>` holds its hyperparameters, checked by the record's own args type.

The library's `models.create_model` takes plain arguments; this is the one place that reads the
config's model fields for it (the trainer, the evaluator, the command lines and the benchmark).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections

from fastadv_jax import models, registry


def model_args(config: ml_collections.ConfigDict) -> Any:
  """The args record of `config.model` from `config.model_args.<model>` (defaults where a field
  or the section is absent). ValueError for an unknown model; registry.ArgError for a bad field."""
  return registry.args_from_section(models.get(config.model).make_args,
                                    config.model_args.get(config.model, None))


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 bn_axis_name: str | None = None, half_precision: bool | None = None) -> nn.Module:
  """`models.create_model` for the config's model, args, precision (`half_precision` overrides
  it) and input normalisation (`input_mean` / `input_std`)."""
  try:
    args = model_args(config)
  except registry.ArgError as e:  # before ValueError, which it is
    raise ValueError(f"config.model_args.{config.model}.{e.field}: {e.message}") from None
  except ValueError as e:  # an unknown model
    raise ValueError(f"config.model: {e}") from None
  return models.create_model(
      config.model, num_classes, args=args,
      half_precision=config.half_precision if half_precision is None else half_precision,
      input_mean=tuple(config.input_mean), input_std=tuple(config.input_std),
      bn_axis_name=bn_axis_name)
