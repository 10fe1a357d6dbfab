"""A run's config resolved once: its method, model and dataset records and their typed args.

The trainer resolves its config here, after validating it, and passes the plan down: no module
below looks a name up in a registry again, so a record (a plugin's too) is read once per run and
every part of the run sees the same one. Callers of the trainer's pieces who hold a config may
pass it instead; `of` resolves it at that edge.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from fastadv_jax import methods, models, registry
from fastadv_jax.data import datasets


@dataclasses.dataclass(frozen=True)
class RunPlan:
  config: ml_collections.ConfigDict
  method: methods.Method
  method_args: Any                # an instance of method.args
  model: models.ModelSpec
  model_args: Any                 # an instance of model.args
  dataset: datasets.DatasetSpec

  @property
  def num_classes(self) -> int:
    return self.dataset.num_classes

  @property
  def gradalign_derivative(self) -> str:
    """'jvp' or 'double_backprop' (config.grad_align_derivative, 'auto' resolved by the model's
    record, models.ModelSpec.gradalign_derivative: jvp for the ResNets, where XLA:CPU ran
    GradAlign 1.6-1.7x faster with it; double backpropagation for the CNNs, where it was as
    fast or faster (BENCHMARKS.md, optimisation log); never jvp when g1 is differentiated too,
    which only double backpropagation does)."""
    if self.config.grad_align_backprop_g1:
      return "double_backprop"
    if self.config.grad_align_derivative == "auto":
      return self.model.gradalign_derivative
    return self.config.grad_align_derivative


def model_args(config: ml_collections.ConfigDict, model: models.ModelSpec) -> Any:
  """The args record of `model` from `config.model_args.<model>` (defaults where a field or the
  section is absent); registry.ArgError for a bad field."""
  return registry.args_from_section(model.make_args, config.model_args.get(model.name, None))


def resolve_model(config: ml_collections.ConfigDict) -> tuple[models.ModelSpec, Any]:
  """(the record of config.model, its args); a one-line ValueError naming the config field."""
  try:
    model = models.get(config.model)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None
  try:
    return model, model_args(config, model)
  except registry.ArgError as e:
    raise ValueError(f"config.model_args.{config.model}.{e.field}: {e.message}") from None


def resolve(config: ml_collections.ConfigDict) -> RunPlan:
  """The plan of `config`; a one-line ValueError naming the config field that does not resolve
  (config_validation checks all of them first in the trainer)."""
  try:
    method = methods.get(config.method)
  except ValueError as e:
    raise ValueError(f"config.method: {e}") from None
  model, margs = resolve_model(config)
  try:
    dataset = datasets.get(config.dataset)
  except ValueError as e:
    raise ValueError(f"config.dataset: {e}") from None
  try:
    method_args = method.args_from(config)
  except registry.ArgError as e:
    raise ValueError(f"config.method_args.{config.method}.{e.field}: {e.message}") from None
  return RunPlan(config=config, method=method, method_args=method_args, model=model,
                 model_args=margs, dataset=dataset)


def of(config_or_plan: ml_collections.ConfigDict | RunPlan) -> RunPlan:
  """A plan as it is; a config resolved (for callers at the trainer's edge)."""
  if isinstance(config_or_plan, RunPlan):
    return config_or_plan
  return resolve(config_or_plan)
