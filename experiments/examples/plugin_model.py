"""A model registered from outside the library: LeNet-5 (ReLU, max-pool), trained and evaluated
by the library's own command lines.

  PYTHONPATH=experiments/examples .venv/bin/python -m fastadv_jax.main \
      --config=configs/fashion_mnist.py:gradalign,eps=32 --workdir=runs/examples/lenet \
      --config.plugins=plugin_model --config.model=lenet5 --config.model_args.lenet5.width=6
  PYTHONPATH=experiments/examples .venv/bin/python -m fastadv_jax.evaluate \
      --workdir=runs/examples/lenet --n_eval=500 --pgd_steps=50 --pgd_restarts=10

`config.plugins` is recorded in config.json, so `evaluate` imports this module again (it must be
importable: the same PYTHONPATH). The model's own hyperparameter is `width`, the first conv's
width (6 in LeCun's): declared by LeNet5Args, it is the config field `model_args.lenet5.width`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastadv_jax import models, registry
from fastadv_jax.runtime import xla_cpu

NAME = "lenet5"


class LeNet5(nn.Module):
  """conv5x5(w)-ReLU-pool, conv5x5(16/6 w)-ReLU-pool, fc120, fc84, fc(classes); no BatchNorm."""
  num_classes: int = 10
  width: int = 6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no BatchNorm, no dropout
    h = x.astype(self.dtype)
    for i, f in enumerate((self.width, max(1, round(self.width * 16 / 6)))):
      h = nn.Conv(f, (5, 5), padding="SAME" if i == 0 else "VALID", dtype=self.dtype,
                  name=f"conv{i}")(h)
      h = nn.max_pool(nn.relu(h), (2, 2), (2, 2))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(nn.Dense(120, dtype=self.dtype, name="fc0")(h))
    h = nn.relu(nn.Dense(84, dtype=self.dtype, name="fc1")(h))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(h).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LeNet5Args:
  """The model's hyperparameters: `config.model_args.lenet5.<field>`, checked here."""
  width: int = 6

  def __post_init__(self):
    registry.check(self.width >= 1, "width", f"must be >= 1, got {self.width}")


def build(args: LeNet5Args, num_classes: int, dtype, bn_axis_name: str | None) -> nn.Module:
  """The record's constructor, from its own args record."""
  del bn_axis_name  # no BatchNorm
  return LeNet5(num_classes=num_classes, width=args.width, dtype=dtype)


RECORD = models.register(models.ModelSpec(
    NAME, build, args=LeNet5Args, xla_flags=xla_cpu.CNN_FLAGS,
    gradalign_derivative="double_backprop", torch=None, input_shape=(28, 28, 1)))
