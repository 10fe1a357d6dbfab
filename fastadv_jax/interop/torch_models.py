"""PyTorch definitions of this library's models, in the state_dict layout of the original code.

This file is self-contained (it imports only torch, numpy and the standard library): the
exporter (torch_interop.py) copies it next to the exported weights as `model.py`, so the export
can be loaded where fastadv_jax is not installed:

    import model
    net = model.load("export_dir")          # nn.Module in eval mode, NCHW input in [0, 1]

Layouts: PreAct ResNet-18 as Wong et al.'s fast_adversarial and RobustBench's PreActResNet18
(conv1, layer1..4.{0,1}.{bn1,conv1,bn2,conv2,shortcut.0}, bn, linear); the paper's CNN as
Andriushchenko & Flammarion's code (_model.{0,2,..}: conv, ReLU, ..., Flatten, Linear); the small
CNN as conv0, bn0, conv1, bn1, fc, linear; the WideResNet as RobustBench's `WideResNet` (TRADES'
code: conv1, block1..3.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc).

Inputs are pixels in [0, 1]. A model built with `mean` and `std` (the run's config.input_mean /
input_std) normalises them first, (x - mu) / sigma, with the buffers `mu` and `sigma` of shape
(1, C, 1, 1) in its state_dict: the names RobustBench's models with a normalisation use. Without
them the model has neither buffer and takes the pixels as they are.

Which state_dict keys map to which Flax layers, and the constructor arguments written to
spec.json, are part of each model's record in fastadv_jax (models.ModelSpec.torch); this file
only has to build the module `spec["architecture"]` names. A model registered by a plugin brings
its own self-contained file instead (models.TorchLayout.module_file), with its own `load`.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class _Normalizing(nn.Module):
  """A model that may normalise its input: `mu` / `sigma` buffers only when given."""

  def _set_normalization(self, mean, std, channels: int) -> None:
    if mean is None and std is None:
      return
    if mean is None or std is None or len(mean) != channels or len(std) != channels:
      raise ValueError(f"mean and std need {channels} values each, got {mean} and {std}")
    self.register_buffer("mu", torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1))
    self.register_buffer("sigma", torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1))

  def normalize(self, x):
    return (x - self.mu) / self.sigma if hasattr(self, "mu") else x


class _PreActLayers(nn.Module):
  """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 plus a shortcut: the layers (bn1, conv1, bn2,
  conv2) both pre-activation blocks share; each names its own 1x1 shortcut conv."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)

  def shortcut_of(self, x, activated):
    raise NotImplementedError

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut_of(x, out)
    out = self.conv2(F.relu(self.bn2(self.conv1(out))))
    return out + shortcut


class PreActBlock(_PreActLayers):
  """PreAct ResNet's block: `shortcut.0` (1x1, stride) of the activated input where the shape
  changes."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__(in_planes, planes, stride)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

  def shortcut_of(self, x, activated):
    return self.shortcut(activated) if hasattr(self, "shortcut") else x


class PreActResNet18(_Normalizing):
  def __init__(self, num_classes: int = 10, in_channels: int = 3,
               stage_widths=(64, 128, 256, 512), mean=None, std=None):
    super().__init__()
    self._set_normalization(mean, std, in_channels)
    self.conv1 = nn.Conv2d(in_channels, stage_widths[0], 3, 1, 1, bias=False)
    in_planes = stage_widths[0]
    for stage, width in enumerate(stage_widths):
      blocks = []
      for block in range(2):
        blocks.append(PreActBlock(in_planes, width, 2 if (stage > 0 and block == 0) else 1))
        in_planes = width
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.bn = nn.BatchNorm2d(in_planes)
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    out = self.conv1(self.normalize(x))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    out = F.relu(self.bn(out))
    out = F.avg_pool2d(out, 4)
    return self.linear(out.flatten(1))


class PaperCNN(_Normalizing):
  def __init__(self, num_classes: int = 10, in_channels: int = 3, height: int = 32,
               width: int = 32, n_filters: int = 4, n_layers: int = 1, mean=None, std=None):
    super().__init__()
    self._set_normalization(mean, std, in_channels)
    layers = []
    for i in range(n_layers):
      layers += [nn.Conv2d(in_channels if i == 0 else n_filters, n_filters, 3, 1, 1), nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(n_filters * height * width, num_classes)]
    self._model = nn.Sequential(*layers)

  def forward(self, x):
    return self._model(self.normalize(x))


class SmallCNN(_Normalizing):
  def __init__(self, num_classes: int = 10, in_channels: int = 1, height: int = 28,
               width: int = 28, n_filters: int = 16, use_batch_norm: bool = True,
               mean=None, std=None):
    super().__init__()
    self._set_normalization(mean, std, in_channels)
    self.use_batch_norm = use_batch_norm
    c_in = in_channels
    for i, f in enumerate((n_filters, 2 * n_filters)):
      setattr(self, f"conv{i}", nn.Conv2d(c_in, f, 3, 1, 1, bias=not use_batch_norm))
      if use_batch_norm:
        setattr(self, f"bn{i}", nn.BatchNorm2d(f))
      c_in = f
    self.fc = nn.Linear(c_in * (height // 4) * (width // 4), 4 * n_filters)
    self.linear = nn.Linear(4 * n_filters, num_classes)

  def forward(self, x):
    out = self.normalize(x)
    for i in range(2):
      out = getattr(self, f"conv{i}")(out)
      if self.use_batch_norm:
        out = getattr(self, f"bn{i}")(out)
      out = F.max_pool2d(F.relu(out), 2)
    return self.linear(F.relu(self.fc(out.flatten(1))))


class WideBlock(_PreActLayers):
  """RobustBench's WideResNet block: the input, or `convShortcut` (1x1, stride) of the activated
  input where the width changes (the first block of each group, but of group 1 only when
  widen_factor > 1)."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__(in_planes, planes, stride)
    self.convShortcut = (nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)
                         if in_planes != planes else None)

  def shortcut_of(self, x, activated):
    return x if self.convShortcut is None else self.convShortcut(activated)


class WideGroup(nn.Module):
  """One group of blocks as RobustBench's NetworkBlock (the blocks are `layer.<i>`)."""

  def __init__(self, n: int, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else planes, planes,
                                           stride if i == 0 else 1) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(_Normalizing):
  """RobustBench's WideResNet-depth-widen_factor (state_dict keys and forward pass), with
  `in_channels` and the optional normalisation. The global average pool is RobustBench's
  avg_pool2d(8) on a 32x32 input (8x8 maps) and also fits other sizes."""

  def __init__(self, depth: int = 28, num_classes: int = 10, widen_factor: int = 10,
               in_channels: int = 3, mean=None, std=None):
    super().__init__()
    if depth < 10 or (depth - 4) % 6:
      raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
    self._set_normalization(mean, std, in_channels)
    n = (depth - 4) // 6
    widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
    self.block1 = WideGroup(n, widths[0], widths[1], 1)
    self.block2 = WideGroup(n, widths[1], widths[2], 2)
    self.block3 = WideGroup(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
    out = F.relu(self.bn1(out))
    return self.fc(out.mean(dim=(2, 3)))


ARCHITECTURES = {"preact_resnet18": PreActResNet18, "cnn": PaperCNN, "small_cnn": SmallCNN,
                 "wide_resnet": WideResNet}


def build(spec: dict) -> nn.Module:
  """The module described by an export's `spec.json` (architecture name and arguments)."""
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec["kwargs"].items()}
  if spec["architecture"] not in ARCHITECTURES:
    raise ValueError(f"architecture {spec['architecture']!r} is not defined in this file "
                     f"({', '.join(ARCHITECTURES)}); a plugin model's export ships its own")
  return ARCHITECTURES[spec["architecture"]](**kwargs)


def load(export_dir: str) -> nn.Module:
  """The exported model with its weights, in eval mode (model.pt, else state_dict.npz)."""
  with open(os.path.join(export_dir, "spec.json")) as f:
    net = build(json.load(f))
  pt = os.path.join(export_dir, "model.pt")
  if os.path.exists(pt):
    state = torch.load(pt, map_location="cpu")
  else:
    with np.load(os.path.join(export_dir, "state_dict.npz")) as npz:
      state = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
  net.load_state_dict(state)
  return net.eval()
