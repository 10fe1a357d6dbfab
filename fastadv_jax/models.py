"""The paper's models in Flax Linen, and the open registry that names them.

Each model is one `ModelSpec` record: its hyperparameters (`args`, a frozen dataclass with
defaults; in a config `model_args.<model>.<field>`), how to build it from them, the XLA:CPU flags
it runs with, what GradAlign's `grad_align_derivative="auto"` resolves to for it, and its
PyTorch layout. Everything that depends on the model (create_model, config validation, the
command lines' XLA flags, the step's GradAlign, torch_interop) reads that record, so a model
defined outside the package, with fields of its own, is one `models.register(ModelSpec(...))` in
a plugin module (fastadv_jax/runtime/plugins.py).

All models take images in [0, 1] (NHWC: eps lives in pixel space); `input_mean` / `input_std`
make create_model wrap the model in `InputNormalization`, which computes
(x - mean) / std first and leaves the parameters as they are (same names, same values). They compute
in `dtype` (bfloat16 for mixed precision) with float32 parameters, and return float32 logits.
`bn_axis_name` makes BatchNorm average its batch statistics over a pmapped axis, so that an
N-device step normalises with the statistics of the whole global batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import registry
from fastadv_jax.runtime import xla_cpu

__all__ = [
    "ModelSpec", "TorchEntry", "TorchLayout", "register", "unregister", "get", "names",
    "create_model", "xla_flags", "CNNArgs", "SmallCNNArgs", "PreActResNet18Args", "WideResNetArgs",
    "PreActResNet18", "PreActBlock", "WideResNet", "PaperCNN", "SmallCNN", "max_pool_2x2",
    "ResNetConv", "InputNormalization", "DERIVATIVES", "TORCH_KINDS",
]

Dtype = Any

# PreAct ResNet-18 init (docs/algorithms.md §3): conv N(0, 2/(k*k*C_out)), linear N(0, 2/fan_in), biases 0.
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
  """A bias-free 'same' conv with the ResNets' init (docs/algorithms.md §3)."""
  pad = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
  return ResNetConv(features, (kernel, kernel), (stride, stride), padding=pad, use_bias=False,
                    kernel_init=_conv_init, dtype=dtype, name=name)


def _two_block_stages(block: type[nn.Module], out: jax.Array, widths: tuple[int, ...],
                      dtype: Dtype, bn_axis_name: str | None, train: bool) -> jax.Array:
  """The ResNet-18 body: per width a stage of two `block`s (`layer<stage>_<i>`), the first of
  each stage after the first with stride 2. Called inside the model's compact __call__."""
  for stage, width in enumerate(widths):
    for i in range(2):
      stride = 1 if (stage == 0 or i > 0) else 2
      out = block(width, stride, dtype, bn_axis_name, name=f"layer{stage + 1}_{i}")(out, train)
  return out


def _linear_head(features: jax.Array, num_classes: int, dtype: Dtype) -> jax.Array:
  """The ResNets' final linear layer (`linear`), logits in at least float32."""
  logits = nn.Dense(num_classes, kernel_init=_linear_init, bias_init=nn.initializers.zeros,
                    dtype=dtype, name="linear")(features)
  return logits.astype(jnp.promote_types(dtype, jnp.float32))


class _ResidualBlock(nn.Module):
  """What every residual block takes: its width, its stride, the compute dtype and the device
  axis its BatchNorm statistics are shared over (None: not shared)."""
  planes: int
  stride: int
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  def reshapes(self, x: jax.Array) -> bool:
    """Whether the shortcut needs a 1x1 conv: the block changes the input's shape."""
    return self.stride != 1 or x.shape[-1] != self.planes


class PreActBlock(_ResidualBlock):
  """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus the input, or a 1x1 conv of the activated
  input when the shape changes (PreAct ResNet, and the WideResNets of RobustBench / TRADES)."""

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype)
    out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
    if self.reshapes(x):
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
    out = _two_block_stages(PreActBlock, out, self.stage_widths, self.dtype, self.bn_axis_name,
                            train)
    out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn")(out))
    out = nn.avg_pool(out, (4, 4), strides=(4, 4))
    return _linear_head(out.reshape(out.shape[0], -1), self.num_classes, self.dtype)


class BasicBlock(_ResidualBlock):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN plus the input (or a 1x1 conv + BN of it when the
  shape changes), then ReLU: the post-activation block of the standard ResNet-18."""

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(_conv, dtype=self.dtype)
    bn = functools.partial(_batch_norm, train, self.dtype, self.bn_axis_name)
    out = nn.relu(bn("bn1")(conv(self.planes, 3, self.stride, "conv1")(x)))
    out = bn("bn2")(conv(self.planes, 3, 1, "conv2")(out))
    if self.reshapes(x):
      x = bn("shortcut_bn")(conv(self.planes, 1, self.stride, "shortcut")(x))
    return nn.relu(out + x)


class ResNet18(nn.Module):
  """The standard (post-activation) ResNet-18 for 32x32 inputs that the 2024-26 fast-AT
  benchmark trains: 3x3 stem conv-BN-ReLU of 64, four stages of two BasicBlocks (64, 128, 256,
  512; strides 1, 2, 2, 2), 4x4 average pool, linear. 11,173,962 parameters for 10 classes
  (tested)."""
  num_classes: int = 10
  dtype: Dtype = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = _conv(64, 3, 1, "conv1", self.dtype)(x.astype(self.dtype))
    out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(out))
    out = _two_block_stages(BasicBlock, out, (64, 128, 256, 512), self.dtype, self.bn_axis_name,
                            train)
    out = nn.avg_pool(out, (4, 4), strides=(4, 4))
    return _linear_head(out.reshape(out.shape[0], -1), self.num_classes, self.dtype)


class WideResNet(nn.Module):
  """WideResNet-depth-widen (Zagoruyko & Komodakis 2016) as RobustBench's CIFAR models:
  3x3 stem conv of 16, three groups of (depth - 4) / 6 blocks of widths 16k, 32k, 64k with
  strides 1, 2, 2, BN-ReLU, global average pool (RobustBench's avg_pool 8 on the 8x8 maps of a
  32x32 input), linear. A block has its 1x1 shortcut where it changes the width, as
  RobustBench's `convShortcut` (the PyTorch layout maps one to the other). WRN-28-10: 36.5M
  parameters, WRN-34-10: 46.2M (tested)."""
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
    return _linear_head(jnp.mean(out, axis=(1, 2)), self.num_classes, self.dtype)


class InputNormalization(nn.Module):
  """`inner` applied to (x - mean) / std, per channel, as RobustBench's models with `mu` /
  `sigma` buffers do. The attack still sees pixels in [0, 1]. It shares `inner`'s scope
  (nn.share_scope), so the parameters keep the names and the values `inner` alone gets."""
  inner: nn.Module
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def setup(self):
    nn.share_scope(self, self.inner)

  @property
  def dtype(self) -> Dtype:
    """The inner model's compute dtype (evaluation checks it)."""
    return getattr(self.inner, "dtype", jnp.float32)

  def __call__(self, x, *args, **kwargs):
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return self.inner((x.astype(jnp.float32) - mean) / std, *args, **kwargs)


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


# ----------------------------------------------------------------------------------------------
# The registry: one record per model.

DERIVATIVES = ("jvp", "double_backprop")
TORCH_KINDS = ("conv", "conv_bias", "dense", "dense_flat", "bn")

BuildFn = Callable[[Any, int, Dtype, "str | None"], nn.Module]  # (args, classes, dtype, axis)


@dataclasses.dataclass(frozen=True)
class TorchEntry:
  """One layer of a PyTorch state_dict: which Flax module it is and how its arrays convert."""
  torch: str            # key prefix in the state_dict, e.g. "layer1.0.conv1"
  flax: tuple           # module path in the Flax params (and batch_stats for "bn")
  kind: str             # conv | conv_bias | dense | dense_flat | bn (torch_interop converts each)
  flat_hwc: tuple = ()  # dense_flat: the (h, w, c) feature map flattened before this layer

  def __post_init__(self):
    if self.kind not in TORCH_KINDS:
      raise ValueError(f"TorchEntry {self.torch!r}: kind must be one of {TORCH_KINDS}, "
                       f"got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class TorchLayout:
  """A model's PyTorch layout, which torch_interop exports to and imports from.

  `entries(args, params, image_shape)` lists its layers in the state_dict; `kwargs(args,
  num_classes, image_shape)` are the constructor arguments written to the export's spec.json
  (with `"architecture": <model name>`); `module_file` is the self-contained PyTorch file copied
  next to the export as model.py, whose `load(export_dir)` rebuilds the module (None: this
  package's torch_models.py, which defines the built-in models). A config with input_mean /
  input_std adds `mean` and `std` to the kwargs and `mu` / `sigma` buffers to the state_dict
  (torch_interop), which a module_file's module then has to take.

  Import is strict: every key of a state_dict must be one the entries read, except
  `unused_prefixes` (keys of this architecture's checkpoints that its forward pass never reads,
  e.g. the `sub_block1.` of RobustBench's WideResNets). `fields(state_dict)`, when given, reads
  the args fields that size the architecture off a state_dict, so that a refused import can
  say which architecture the file holds (e.g. {"depth": 34, "widen": 10})."""
  entries: Callable[[Any, Mapping, tuple], list[TorchEntry]]
  kwargs: Callable[[Any, int, tuple], dict]
  module_file: str | None = None
  unused_prefixes: tuple[str, ...] = ()
  fields: Callable[[Mapping], dict] | None = None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything the library needs to know about one model, in one place.

  name: the value of `config.model`.
  build: `build(args, num_classes, dtype, bn_axis_name) -> nn.Module`, where `args` is an
    instance of `args` (images in [0, 1], NHWC; float32 logits).
  args: its hyperparameters, a frozen dataclass type whose defaults are the usual values and
    whose `__post_init__` refuses values it cannot build (registry.check); in a config they
    are `model_args.<name>.<field>` (`--config.model_args.cnn.n_filters=8`).
  xla_flags: the XLA_FLAGS it runs with on CPU (xla_cpu.CNN_FLAGS or RESNET_FLAGS; measured in
    BENCHMARKS.md), applied by the command lines before JAX's backend starts.
  gradalign_derivative: what `grad_align_derivative="auto"` resolves to: "jvp" or
    "double_backprop" (whichever ran GradAlign faster for this model).
  torch: its PyTorch layout, or None when it cannot be exported (torch_interop then says so).
  input_shape: the (H, W, C) of the data it is usually trained on, for the benchmark's rows.
  """
  name: str
  build: BuildFn
  args: type = registry.NoArgs
  xla_flags: Mapping[str, str] = dataclasses.field(default_factory=lambda: xla_cpu.CNN_FLAGS)
  gradalign_derivative: str = "double_backprop"
  torch: TorchLayout | None = None
  input_shape: tuple[int, int, int] = (32, 32, 3)

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"ModelSpec.name must be a non-empty string, got {self.name!r}")
    if not callable(self.build):
      raise ValueError(f"ModelSpec {self.name!r}: build must be callable")
    if not registry.is_args_type(self.args):
      raise ValueError(f"ModelSpec {self.name!r}: args must be a dataclass type, got {self.args!r}")
    if self.gradalign_derivative not in DERIVATIVES:
      raise ValueError(f"ModelSpec {self.name!r}: gradalign_derivative must be one of "
                       f"{DERIVATIVES}, got {self.gradalign_derivative!r}")
    if self.torch is not None and not isinstance(self.torch, TorchLayout):
      raise ValueError(f"ModelSpec {self.name!r}: torch must be a TorchLayout or None")

  @property
  def arg_names(self) -> tuple[str, ...]:
    return registry.arg_names(self.args)

  def make_args(self, values: Mapping[str, Any] | None = None) -> Any:
    """The args record from plain values (missing fields take their defaults); ArgError names
    a bad or unknown field."""
    return registry.make_args(self.args, values, self.name)


_REGISTRY: registry.Registry[ModelSpec] = registry.Registry(
    "model", ModelSpec, " (or register one: models.register in a --config.plugins module)")


def register(spec: ModelSpec) -> ModelSpec:
  """Adds `spec` under `spec.name`; returns it. The same record again is a no-op; a different
  record under a taken name is a ValueError, so one model name never means two models."""
  return _REGISTRY.register(spec)


def unregister(name: str) -> None:
  _REGISTRY.unregister(name)


def names() -> tuple[str, ...]:
  """The registered model names, in registration order (read at call time: plugins add)."""
  return _REGISTRY.names()


def get(name: str) -> ModelSpec:
  """The record of model `name`; ValueError naming the registered models if there is none."""
  return _REGISTRY.get(name)


def xla_flags(name: str | None) -> dict[str, str]:
  """The XLA:CPU flags model `name` runs with (its record's `xla_flags`), for
  `xla_cpu.apply(flags=...)`; xla_cpu.CNN_FLAGS when None or not registered (e.g. a plugin not
  imported yet: the config check names an unknown model later, in one line)."""
  if name and name in _REGISTRY.names():
    return dict(get(name).xla_flags)
  return dict(xla_cpu.CNN_FLAGS)


def penultimate_features(apply: Callable[[jax.Array], jax.Array], x: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """(features, logits) of a linen model: `apply(x)` returns its logits, and the features are
  the input of the last `nn.Dense` it calls (the classifier head), flattened per example. For
  methods that read the representation (FGSM-FUAP); any model whose last layer is an
  `nn.Dense` works, with no change to the model."""
  seen = []

  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    logits = apply(x)
  if not seen:
    raise ValueError("penultimate_features: the model calls no nn.Dense layer")
  return seen[-1].reshape((x.shape[0], -1)), logits


def create_model(name: str | ModelSpec, num_classes: int, *, args: Any = None,
                 half_precision: bool = False, input_mean: tuple = (), input_std: tuple = (),
                 bn_axis_name: str | None = None) -> nn.Module:
  """Builds model `name` (or the record itself, already looked up) with its args record
  (default: its defaults), computing in bfloat16 when `half_precision`; inside
  InputNormalization when `input_mean` / `input_std` are given."""
  spec = name if isinstance(name, ModelSpec) else get(name)
  dtype = jnp.bfloat16 if half_precision else jnp.float32
  model = spec.build(spec.make_args() if args is None else args, num_classes, dtype, bn_axis_name)
  mean, std = tuple(input_mean), tuple(input_std)
  if not mean and not std:
    return model  # the model itself: nothing changes without normalisation
  return InputNormalization(model, tuple(map(float, mean)), tuple(map(float, std)))


# ----------------------------------------------------------------------------------------------
# The built-in models' records.

@dataclasses.dataclass(frozen=True)
class PreActResNet18Args:
  stage_widths: tuple[int, ...] = (64, 128, 256, 512)  # the paper's

  def __post_init__(self):
    registry.check(len(self.stage_widths) == 4 and min(self.stage_widths) >= 1, "stage_widths",
                   f"must be 4 positive stage widths, got {tuple(self.stage_widths)}")


@dataclasses.dataclass(frozen=True)
class WideResNetArgs:
  depth: int = 28   # 28 or 34: RobustBench's WRN-28-10 / WRN-34-10
  widen: int = 10   # the widening factor k

  def __post_init__(self):
    registry.check(self.depth >= 10 and (self.depth - 4) % 6 == 0, "depth",
                   f"must be 6n + 4 with n >= 1 (e.g. 28, 34), got {self.depth}")
    registry.check(self.widen >= 1, "widen", f"must be >= 1, got {self.widen}")


@dataclasses.dataclass(frozen=True)
class CNNArgs:
  n_filters: int = 16  # filters per conv layer
  n_layers: int = 1

  def __post_init__(self):
    registry.check(self.n_filters >= 1, "n_filters", f"must be >= 1, got {self.n_filters}")
    registry.check(self.n_layers >= 1, "n_layers", f"must be >= 1, got {self.n_layers}")


@dataclasses.dataclass(frozen=True)
class SmallCNNArgs:
  n_filters: int = 16  # the first conv's filters (the second has twice as many)
  use_batch_norm: bool = True

  def __post_init__(self):
    registry.check(self.n_filters >= 1, "n_filters", f"must be >= 1, got {self.n_filters}")


def _build_preact_resnet18(args: PreActResNet18Args, num_classes, dtype, bn_axis_name
                           ) -> nn.Module:
  return PreActResNet18(num_classes=num_classes, dtype=dtype, bn_axis_name=bn_axis_name,
                        stage_widths=tuple(args.stage_widths))


def _build_resnet18(args: registry.NoArgs, num_classes, dtype, bn_axis_name) -> nn.Module:
  del args
  return ResNet18(num_classes=num_classes, dtype=dtype, bn_axis_name=bn_axis_name)


def _build_wide_resnet(args: WideResNetArgs, num_classes, dtype, bn_axis_name) -> nn.Module:
  return WideResNet(num_classes=num_classes, depth=args.depth, widen=args.widen,
                    dtype=dtype, bn_axis_name=bn_axis_name)


def _build_cnn(args: CNNArgs, num_classes, dtype, bn_axis_name) -> nn.Module:
  return PaperCNN(num_classes=num_classes, n_filters=args.n_filters, n_layers=args.n_layers,
                  dtype=dtype, bn_axis_name=bn_axis_name)


def _build_small_cnn(args: SmallCNNArgs, num_classes, dtype, bn_axis_name) -> nn.Module:
  return SmallCNN(num_classes=num_classes, width=args.n_filters,
                  use_batch_norm=args.use_batch_norm, dtype=dtype, bn_axis_name=bn_axis_name)


# PyTorch layouts of the original code (torch_models.py): Wong et al.'s PreActResNet18, the
# paper's CNN as nn.Sequential `_model`, the small CNN's named layers, and RobustBench's
# WideResNet. Input normalisation is not part of a layout: torch_interop adds it to any model.

def _preact_block_entries(torch_prefix: str, flax_name: str, params: Mapping, shortcut: str
                          ) -> list[TorchEntry]:
  """A PreActBlock's layers: bn1, conv1, bn2, conv2 and, where the block has one, its 1x1
  shortcut conv, named `shortcut` under `torch_prefix` (PreAct ResNet's `shortcut.0`,
  RobustBench's WideResNet's `convShortcut`)."""
  t, f = torch_prefix, flax_name
  out = [TorchEntry(f"{t}.bn1", (f, "bn1"), "bn"), TorchEntry(f"{t}.conv1", (f, "conv1"), "conv"),
         TorchEntry(f"{t}.bn2", (f, "bn2"), "bn"), TorchEntry(f"{t}.conv2", (f, "conv2"), "conv")]
  if "shortcut" in params[f]:
    out.append(TorchEntry(f"{t}.{shortcut}", (f, "shortcut"), "conv"))
  return out


def _preact_resnet18_torch_entries(args, params, image_shape) -> list[TorchEntry]:
  del args, image_shape
  out = [TorchEntry("conv1", ("conv1",), "conv")]
  for stage in range(4):
    for block in range(2):
      out += _preact_block_entries(f"layer{stage + 1}.{block}", f"layer{stage + 1}_{block}",
                                   params, "shortcut.0")
  return out + [TorchEntry("bn", ("bn",), "bn"), TorchEntry("linear", ("linear",), "dense")]


def _wide_resnet_torch_entries(args, params, image_shape) -> list[TorchEntry]:
  # RobustBench's WideResNet (TRADES' code): block{1,2,3}.layer.<i>, `convShortcut` where the
  # block changes the width (our PreActBlock's `shortcut`: the same blocks), final `bn1`, `fc`.
  del image_shape
  out = [TorchEntry("conv1", ("conv1",), "conv")]
  for group in range(1, 4):
    for block in range((args.depth - 4) // 6):
      out += _preact_block_entries(f"block{group}.layer.{block}", f"block{group}_{block}",
                                   params, "convShortcut")
  return out + [TorchEntry("bn1", ("bn",), "bn"), TorchEntry("fc", ("linear",), "dense")]


def _wide_resnet_torch_fields(state_dict: Mapping) -> dict:
  """depth and widen of a WideResNet state_dict: blocks per group from block1's layer indices
  (depth = 6 n + 4), widen from its first conv's output channels (16 x widen)."""
  blocks = {k.split(".")[2] for k in state_dict if k.startswith("block1.layer.")}
  out = {"depth": 6 * len(blocks) + 4}
  first = state_dict.get("block1.layer.0.conv1.weight")
  if first is not None and np.ndim(first) == 4 and np.shape(first)[0] % 16 == 0:
    out["widen"] = np.shape(first)[0] // 16
  return out


def _cnn_torch_fields(state_dict: Mapping) -> dict:
  """n_layers and n_filters of the paper CNN's state_dict (convs at _model.0, 2, 4, ...)."""
  convs = [k for k in state_dict if k.startswith("_model.") and k.endswith(".weight")
           and np.ndim(state_dict[k]) == 4]
  first = state_dict.get("_model.0.weight")
  out = {"n_layers": len(convs)}
  if first is not None and np.ndim(first) == 4:
    out["n_filters"] = int(np.shape(first)[0])
  return out


def _wide_resnet_torch_kwargs(args, num_classes, image_shape) -> dict:
  return dict(depth=args.depth, num_classes=num_classes, widen_factor=args.widen,
              in_channels=image_shape[2])


def _preact_resnet18_torch_kwargs(args, num_classes, image_shape) -> dict:
  return dict(num_classes=num_classes, in_channels=image_shape[2],
              stage_widths=list(args.stage_widths))


def _cnn_torch_entries(args, params, image_shape) -> list[TorchEntry]:
  del params
  h, w, _ = image_shape
  out = [TorchEntry(f"_model.{2 * i}", (f"conv{i}",), "conv_bias")
         for i in range(args.n_layers)]
  return out + [TorchEntry(f"_model.{2 * args.n_layers + 1}", ("linear",), "dense_flat",
                           (h, w, args.n_filters))]


def _cnn_torch_kwargs(args, num_classes, image_shape) -> dict:
  h, w, c = image_shape
  return dict(num_classes=num_classes, in_channels=c, height=h, width=w,
              n_filters=args.n_filters, n_layers=args.n_layers)


def _small_cnn_torch_entries(args, params, image_shape) -> list[TorchEntry]:
  del params
  h, w, _ = image_shape
  out = []
  kind = "conv" if args.use_batch_norm else "conv_bias"
  for i in range(2):
    out.append(TorchEntry(f"conv{i}", (f"conv{i}",), kind))
    if args.use_batch_norm:
      out.append(TorchEntry(f"bn{i}", (f"bn{i}",), "bn"))
  return out + [TorchEntry("fc", ("fc",), "dense_flat", (h // 4, w // 4, 2 * args.n_filters)),
                TorchEntry("linear", ("linear",), "dense")]


def _small_cnn_torch_kwargs(args, num_classes, image_shape) -> dict:
  h, w, c = image_shape
  return dict(num_classes=num_classes, in_channels=c, height=h, width=w,
              n_filters=args.n_filters, use_batch_norm=args.use_batch_norm)


# The flags and derivative modes as measured (BENCHMARKS.md; xla_cpu's docstring, item 1): the
# ResNets run with YNNPACK's convolutions off and GradAlign by jvp (1.6-1.7x faster there); the
# CNNs with oneDNN and double backpropagation (as fast or faster).
register(ModelSpec("preact_resnet18", _build_preact_resnet18, PreActResNet18Args,
                   xla_cpu.RESNET_FLAGS, "jvp",
                   TorchLayout(_preact_resnet18_torch_entries, _preact_resnet18_torch_kwargs)))
register(ModelSpec("resnet18", _build_resnet18, registry.NoArgs, xla_cpu.RESNET_FLAGS, "jvp"))
register(ModelSpec("wide_resnet", _build_wide_resnet, WideResNetArgs, xla_cpu.RESNET_FLAGS, "jvp",
                   TorchLayout(_wide_resnet_torch_entries, _wide_resnet_torch_kwargs,
                               unused_prefixes=("sub_block1.",),
                               fields=_wide_resnet_torch_fields)))
register(ModelSpec("cnn", _build_cnn, CNNArgs, xla_cpu.CNN_FLAGS, "double_backprop",
                   TorchLayout(_cnn_torch_entries, _cnn_torch_kwargs,
                               fields=_cnn_torch_fields)))
register(ModelSpec("small_cnn", _build_small_cnn, SmallCNNArgs, xla_cpu.CNN_FLAGS,
                   "double_backprop",
                   TorchLayout(_small_cnn_torch_entries, _small_cnn_torch_kwargs),
                   input_shape=(28, 28, 1)))
