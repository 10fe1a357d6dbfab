"""PyTorch definitions of this library's models, in the state_dict layout of the original code.

This file is self-contained (it imports only torch, numpy and the standard library): the
exporter (torch_interop.py) copies it next to the exported weights as `model.py`, so the export
can be loaded where fastadv_jax is not installed:

    import model
    net = model.load("export_dir")          # nn.Module in eval mode, NCHW input in [0, 1]

Layouts: PreAct ResNet-18 as Wong et al.'s fast_adversarial and RobustBench's PreActResNet18
(conv1, layer1..4.{0,1}.{bn1,conv1,bn2,conv2,shortcut.0}, bn, linear); the paper's CNN as
Andriushchenko & Flammarion's code (_model.{0,2,..}: conv, ReLU, ..., Flatten, Linear); the small
CNN as conv0, bn0, conv1, bn1, fc, linear. No normalisation layer: inputs are pixels in [0, 1].

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


class PreActBlock(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


class PreActResNet18(nn.Module):
  def __init__(self, num_classes: int = 10, in_channels: int = 3,
               stage_widths=(64, 128, 256, 512)):
    super().__init__()
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
    out = self.conv1(x)
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    out = F.relu(self.bn(out))
    out = F.avg_pool2d(out, 4)
    return self.linear(out.flatten(1))


class PaperCNN(nn.Module):
  def __init__(self, num_classes: int = 10, in_channels: int = 3, height: int = 32,
               width: int = 32, n_filters: int = 4, n_layers: int = 1):
    super().__init__()
    layers = []
    for i in range(n_layers):
      layers += [nn.Conv2d(in_channels if i == 0 else n_filters, n_filters, 3, 1, 1), nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(n_filters * height * width, num_classes)]
    self._model = nn.Sequential(*layers)

  def forward(self, x):
    return self._model(x)


class SmallCNN(nn.Module):
  def __init__(self, num_classes: int = 10, in_channels: int = 1, height: int = 28,
               width: int = 28, n_filters: int = 16, use_batch_norm: bool = True):
    super().__init__()
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
    out = x
    for i in range(2):
      out = getattr(self, f"conv{i}")(out)
      if self.use_batch_norm:
        out = getattr(self, f"bn{i}")(out)
      out = F.max_pool2d(F.relu(out), 2)
    return self.linear(F.relu(self.fc(out.flatten(1))))


ARCHITECTURES = {"preact_resnet18": PreActResNet18, "cnn": PaperCNN, "small_cnn": SmallCNN}


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
