"""The PyTorch side of the plugin model tests/plugins/my_model.py, copied next to its export as
model.py (its TorchLayout's module_file): `load(export_dir)` rebuilds the MLP with its weights.
Self-contained: it needs torch and numpy, not fastadv_jax."""
import json
import os

import numpy as np
import torch
from torch import nn


class MyMLP(nn.Module):
  """flatten (NCHW) -> Linear(hidden) -> ReLU -> Linear(classes), as the Flax MyMLP."""

  def __init__(self, in_features: int, hidden: int, num_classes: int):
    super().__init__()
    self.hidden = nn.Linear(in_features, hidden)
    self.logits = nn.Linear(hidden, num_classes)

  def forward(self, x):
    return self.logits(torch.relu(self.hidden(x.flatten(1))))


def load(export_dir: str) -> nn.Module:
  """The exported MLP with its weights, in eval mode (model.pt, else state_dict.npz)."""
  with open(os.path.join(export_dir, "spec.json")) as f:
    spec = json.load(f)
  if spec["architecture"] != "my_model":
    raise ValueError(f"this file defines my_model, not {spec['architecture']!r}")
  net = MyMLP(**spec["kwargs"])
  pt = os.path.join(export_dir, "model.pt")
  if os.path.exists(pt):
    state = torch.load(pt, map_location="cpu")
  else:
    with np.load(os.path.join(export_dir, "state_dict.npz")) as npz:
      state = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
  net.load_state_dict(state)
  return net.eval()
