"""The paper's models in Flax Linen, chosen by name.

All models take images in [0, 1] (NHWC, no normalisation layer: eps lives in pixel space), compute
in `dtype` (bfloat16 for mixed precision) with float32 parameters, and return float32 logits.
`bn_axis_name` makes BatchNorm average its batch statistics over a pmapped axis, so that an
N-device step normalises with the statistics of the whole global batch.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fastadv_jax import xla_cpu

Dtype = Any

# PreAct ResNet-18 init (SPEC §3): conv N(0, 2/(k*k*C_out)), linear N(0, 2/fan_in), biases 0.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_linear_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# PyTorch's default init for Conv2d / Linear (the paper's CNN uses it): U(+-1/sqrt(fan_in)).
_torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_default_bias(fan_in: int) -> Callable:
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# The ResNets' convolution: on CPU its input is written out first (xla_cpu.materialize: it keeps
# XLA:CPU from fusing BatchNorm-ReLU into the slow transpose its weight gradient needs).
ResNetConv = functools.partial(nn.Conv, conv_general_dilated=xla_cpu.conv_materialized_input)


def _batch_norm(train: bool, dtype: Dtype, axis_name: str | None, name: str | None = None):
  # PyTorch BatchNorm2d defaults: momentum 0.1 (= Flax 0.9), eps 1e-5, affine.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, axis_name=axis_name, name=name)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2/2 max-pool as reshape + max: on XLA:CPU its backward is ~2x faster than nn.max_pool."""
  n, h, w, c = x.shape
  x = x[:, : h - h % 2, : w - w % 2, :]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
  """A bias-free 'same' conv with the ResNets' init (SPEC §3)."""
  pad = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
  return ResNetConv(features, (kernel, kernel), (stride, stride), padding=pad, use_bias=False,
                    kernel_init=_conv_init, dtype=dtype, name=name)


class PreActBlock(nn.Module):
  """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus the input, or a 1x1 conv of the activated
  input when the shape changes (PreAct ResNet, and the WideResNets of RobustBench / TRADES)."""
  planes: int
  stride: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype)
    out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.planes:
      shortcut = conv(self.planes, 1, self.stride, "shortcut")(out)
    else:
      shortcut = x
    out = conv(self.planes, 3, self.stride, "conv1")(out)
    out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn2")(out))
    out = conv(self.planes, 3, 1, "conv2")(out)
    return out + shortcut


class PreActResNet18(nn.Module):
  """PreAct ResNet-18 as in the original code (Wong et al. 2020; Andriushchenko & Flammarion)."""
  num_classes: int = 10
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None
  stage_widths: tuple[int, ...] = (64, 128, 256, 512)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    w0 = self.stage_widths[0]
    out = ResNetConv(w0, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                     kernel_init=_conv_init, dtype=self.dtype, name="conv1")(x)
    for stage, width in enumerate(self.stage_widths):
      for block in range(2):
        stride = 1 if (stage == 0 or block > 0) else 2
        out = PreActBlock(width, stride, self.dtype, self.bn_axis_name,
                          name=f"layer{stage + 1}_{block}")(out, train)
    out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn")(out))
    out = nn.avg_pool(out, (4, 4), strides=(4, 4))
    out = out.reshape(out.shape[0], -1)
    logits = nn.Dense(self.num_classes, kernel_init=_linear_init, bias_init=nn.initializers.zeros,
                      dtype=self.dtype, name="linear")(out)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


class WideResNet(nn.Module):
  """WideResNet-depth-widen (Zagoruyko & Komodakis 2016) as RobustBench's CIFAR models:
  3x3 stem conv of 16, three groups of (depth - 4) / 6 blocks of widths 16k, 32k, 64k with
  strides 1, 2, 2, BN-ReLU, global average pool, linear. WRN-28-10: 36.5M parameters,
  WRN-34-10: 46.2M (tested)."""
  num_classes: int = 10
  depth: int = 28
  widen: int = 10
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4 (e.g. 28, 34), got {self.depth}")
    n = (self.depth - 4) // 6
    out = ResNetConv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                     kernel_init=_conv_init, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
    for group, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
      for block in range(n):
        # RobustBench's WRN block is the same pre-activation block as PreAct ResNet's.
        out = PreActBlock(width * self.widen, stride if block == 0 else 1, self.dtype,
                          self.bn_axis_name, name=f"block{group + 1}_{block}")(out, train)
    out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn")(out))
    out = jnp.mean(out, axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=_linear_init, bias_init=nn.initializers.zeros,
                      dtype=self.dtype, name="linear")(out)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


class PaperCNN(nn.Module):
  """The paper's shallow CNN: n_layers x (3x3 conv with bias, n_filters, ReLU), flatten, linear.

  With n_layers=1 and 4 filters this is the single-layer network that catastrophically
  overfits under FGSM training (paper Section 4). PyTorch default initialisation.
  """
  num_classes: int = 10
  n_filters: int = 4
  n_layers: int = 1
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None  # unused: this model has no BatchNorm

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = x.astype(self.dtype)
    for i in range(self.n_layers):
      fan_in = 9 * out.shape[-1]
      out = nn.Conv(self.n_filters, (3, 3), padding=((1, 1), (1, 1)),
                    kernel_init=_torch_default_kernel, bias_init=_torch_default_bias(fan_in),
                    dtype=self.dtype, name=f"conv{i}")(out)
      out = nn.relu(out)
    out = out.reshape(out.shape[0], -1)
    logits = nn.Dense(self.num_classes, kernel_init=_torch_default_kernel,
                      bias_init=_torch_default_bias(out.shape[-1]), dtype=self.dtype,
                      name="linear")(out)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


class SmallCNN(nn.Module):
  """A small CNN for 28x28 data (the default CPU model).

  conv(w)-[BN]-ReLU-pool, conv(2w)-[BN]-ReLU-pool, dense(4w)-ReLU, dense(classes).
  """
  num_classes: int = 10
  width: int = 16
  use_batch_norm: bool = True
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = x.astype(self.dtype)
    for i, f in enumerate((self.width, 2 * self.width)):
      out = nn.Conv(f, (3, 3), padding=((1, 1), (1, 1)), use_bias=not self.use_batch_norm,
                    kernel_init=_conv_init, dtype=self.dtype, name=f"conv{i}")(out)
      if self.use_batch_norm:
        out = _batch_norm(train, self.dtype, self.bn_axis_name, f"bn{i}")(out)
      out = max_pool_2x2(nn.relu(out))
    out = out.reshape(out.shape[0], -1)
    out = nn.relu(nn.Dense(4 * self.width, kernel_init=_linear_init, dtype=self.dtype,
                           name="fc")(out))
    logits = nn.Dense(self.num_classes, kernel_init=_linear_init, dtype=self.dtype,
                      name="linear")(out)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


MODEL_NAMES = ("preact_resnet18", "wide_resnet", "cnn", "small_cnn")


def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 bn_axis_name: str | None = None, half_precision: bool | None = None) -> nn.Module:
  """Builds the model named by `config.model`; `half_precision` overrides the config's."""
  half = config.half_precision if half_precision is None else half_precision
  dtype = jnp.bfloat16 if half else jnp.float32
  if config.model == "preact_resnet18":
    return PreActResNet18(num_classes=num_classes, dtype=dtype, bn_axis_name=bn_axis_name,
                          stage_widths=tuple(config.resnet_widths))
  if config.model == "wide_resnet":
    return WideResNet(num_classes=num_classes, depth=config.wrn_depth, widen=config.wrn_widen,
                      dtype=dtype, bn_axis_name=bn_axis_name)
  if config.model == "cnn":
    return PaperCNN(num_classes=num_classes, n_filters=config.n_filters,
                    n_layers=config.n_layers, dtype=dtype, bn_axis_name=bn_axis_name)
  if config.model == "small_cnn":
    return SmallCNN(num_classes=num_classes, width=config.n_filters,
                    use_batch_norm=config.use_batch_norm, dtype=dtype, bn_axis_name=bn_axis_name)
  raise ValueError(f"config.model: unknown model {config.model!r}; choose from {MODEL_NAMES}")
