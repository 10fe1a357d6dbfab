"""A model defined outside the package (tests/test_model_plugins.py): a one-hidden-layer MLP.

Imported as a plugin (`--config.plugins=my_model` with tests/plugins on PYTHONPATH), it
registers its own record with a hyperparameter of its own (`hidden`, the hidden width: in a
config `model_args.my_model.hidden`, checked by MyMLPArgs), run under the
ResNets' XLA flags and with GradAlign by jvp (both unlike the default a plugin gets, so the test
can see the record was read), and with a PyTorch layout of its own: torch_export writes its two
layers as `hidden` and `logits` and ships my_model_torch.py as the export's model.py.
"""
from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax.numpy as jnp

from fastadv_jax import models, registry
from fastadv_jax.runtime import xla_cpu

NAME = "my_model"


class MyMLP(nn.Module):
  """flatten -> Dense(hidden) -> ReLU -> Dense(classes); float32 logits."""
  num_classes: int = 10
  hidden: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm, no dropout
    out = x.astype(self.dtype).reshape(x.shape[0], -1)
    out = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="my_hidden")(out))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="my_logits")(out)
    return logits.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class MyMLPArgs:
  hidden: int = 8

  def __post_init__(self):
    registry.check(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}")


def build(args: MyMLPArgs, num_classes: int, dtype, bn_axis_name: str | None) -> nn.Module:
  del bn_axis_name  # no BatchNorm
  return MyMLP(num_classes=num_classes, hidden=args.hidden, dtype=dtype)


def torch_entries(args: MyMLPArgs, params, image_shape: tuple) -> list[models.TorchEntry]:
  del args, params
  return [models.TorchEntry("hidden", ("my_hidden",), "dense_flat", flat_hwc=tuple(image_shape)),
          models.TorchEntry("logits", ("my_logits",), "dense")]


def torch_kwargs(args: MyMLPArgs, num_classes: int, image_shape: tuple) -> dict:
  return {"in_features": math.prod(image_shape), "hidden": args.hidden,
          "num_classes": num_classes}


TORCH = models.TorchLayout(
    entries=torch_entries, kwargs=torch_kwargs,
    module_file=os.path.join(os.path.dirname(os.path.abspath(__file__)), "my_model_torch.py"))

RECORD = models.register(models.ModelSpec(
    NAME, build, args=MyMLPArgs, xla_flags=xla_cpu.RESNET_FLAGS, gradalign_derivative="jvp",
    torch=TORCH))
