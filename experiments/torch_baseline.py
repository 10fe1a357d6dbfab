"""PyTorch baseline of the benchmark: the same models and training steps, timed the same way.

Standalone (torch + numpy only, no JAX), so it can run in another environment, e.g. the
Python 3.11 one where `pip install torch==2.13.0` takes this machine's CPU build:
  python experiments/torch_baseline.py --rows='[{"model": "small_cnn", "method": "fgsm",
      "batch": 128, "dtype": "float32"}]' --windows=5 --steps=10
Prints one JSON list of results. fastadv_jax.benchmark calls it with --torch_python.

The steps mirror the original code: FGSM / FGSM-RS / PGD-k perturbations, GradAlign with the
clean gradient reused from FGSM and detached (or, `gradalign_full`, differentiated too),
BatchNorm in train mode for every pass, SGD momentum 0.9 with weight decay 5e-4.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class PreActBlock(nn.Module):
  def __init__(self, c_in, planes, stride):
    super().__init__()
    self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(planes)
    self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.shortcut = (nn.Conv2d(c_in, planes, 1, stride, bias=False)
                     if stride != 1 or c_in != planes else None)

  def forward(self, x):
    out = F.relu(self.bn1(x))
    sc = self.shortcut(out) if self.shortcut is not None else x
    out = self.conv1(out)
    return self.conv2(F.relu(self.bn2(out))) + sc


class PreActResNet18(nn.Module):
  def __init__(self, num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    layers, c_in = [], 64
    for i, w in enumerate((64, 128, 256, 512)):
      for b in range(2):
        layers.append(PreActBlock(c_in, w, 2 if (i > 0 and b == 0) else 1))
        c_in = w
    self.layers = nn.Sequential(*layers)
    self.bn = nn.BatchNorm2d(512)
    self.linear = nn.Linear(512, num_classes)

  def forward(self, x):
    out = F.relu(self.bn(self.layers(self.conv1(x))))
    return self.linear(F.avg_pool2d(out, 4).flatten(1))


class PaperCNN(nn.Module):
  def __init__(self, n_filters=4, n_layers=1, c_in=3, hw=32, num_classes=10):
    super().__init__()
    convs = []
    for i in range(n_layers):
      convs.append(nn.Conv2d(c_in if i == 0 else n_filters, n_filters, 3, 1, 1))
    self.convs = nn.ModuleList(convs)
    self.linear = nn.Linear(n_filters * hw * hw, num_classes)

  def forward(self, x):
    for conv in self.convs:
      x = F.relu(conv(x))
    return self.linear(x.flatten(1))


class SmallCNN(nn.Module):
  def __init__(self, width=16, num_classes=10):
    super().__init__()
    self.conv0, self.bn0 = nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
    self.conv1 = nn.Conv2d(width, 2 * width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(2 * width)
    self.fc = nn.Linear(2 * width * 7 * 7, 4 * width)
    self.linear = nn.Linear(4 * width, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn0(self.conv0(x))), 2)
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
    return self.linear(F.relu(self.fc(x.flatten(1))))


MODELS = {"preact_resnet18": (PreActResNet18, (3, 32, 32)), "cnn": (PaperCNN, (3, 32, 32)),
          "small_cnn": (SmallCNN, (1, 28, 28))}


def input_grad(model, x, y, create_graph=False):
  x = x.clone().requires_grad_(True) if not x.requires_grad else x
  loss = F.cross_entropy(model(x), y, reduction="sum")
  return torch.autograd.grad(loss, x, create_graph=create_graph)[0]


# The methods this baseline implements; fastadv_jax.benchmark times only these in PyTorch.
METHODS = ("standard", "fgsm", "gradalign", "gradalign_full", "fgsm_rs", "pgd2", "pgd10")


def perturbation(model, x, y, method, eps):
  """Returns (delta, clean gradient or None)."""
  if method not in METHODS:
    raise ValueError(f"the PyTorch baseline has no method {method!r}; it has {METHODS}")
  def proj(d):
    return torch.clamp(torch.clamp(d, -eps, eps) + x, 0, 1) - x
  if method == "standard":
    return torch.zeros_like(x), None
  if method in ("fgsm", "gradalign", "gradalign_full"):
    g = input_grad(model, x, y)
    return proj(1.25 * eps * g.sign()).detach(), g.detach()
  if method == "fgsm_rs":
    d = proj(torch.empty_like(x).uniform_(-eps, eps))
    g = input_grad(model, x + d, y)
    return proj(d + 1.25 * eps * g.sign()).detach(), None
  steps, alpha = (2, eps / 2) if method == "pgd2" else (10, eps / 5)
  d = torch.zeros_like(x)
  for _ in range(steps):
    g = input_grad(model, x + d, y)
    d = proj(d + alpha * g.sign()).detach()
  return d, None


def train_step(model, opt, x, y, method, eps, lam, autocast):
  with autocast():
    delta, g1 = perturbation(model, x, y, method, eps)
    loss = F.cross_entropy(model(x + delta), y)
    if method.startswith("gradalign"):
      if method == "gradalign_full":
        g1 = input_grad(model, x, y, create_graph=True)
      eta = torch.empty_like(x).uniform_(-eps, eps)
      g2 = input_grad(model, x + eta, y, create_graph=True)
      a, b = g1.flatten(1).float(), g2.flatten(1).float()
      na, nb = (a * a).sum(1), (b * b).sum(1)
      mask = (na > 0) & (nb > 0)
      cos = (a * b).sum(1) / (na.clamp_min(1e-30).sqrt() * nb.clamp_min(1e-30).sqrt())
      reg = lam * (1 - (cos * mask).sum() / mask.sum().clamp_min(1))
      loss = loss + reg
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  return loss


class StepTimer:
  """One row, warmed up; `window(steps)` times that many steps (synchronised on GPU)."""

  def __init__(self, row: dict, device: str):
    cls, shape = MODELS[row["model"]]
    self.row = row
    self.model = (cls(width=row.get("width", 16)) if row["model"] == "small_cnn"
                  else cls()).to(device)
    self.model.train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    self.x = torch.rand((row["batch"],) + shape, device=device)
    self.y = torch.randint(0, 10, (row["batch"],), device=device)
    dtype = torch.bfloat16 if row["dtype"] == "bfloat16" else None
    kind = device.split(":")[0]
    self.autocast = ((lambda: torch.autocast(kind, dtype=dtype)) if dtype
                     else (lambda: torch.autocast(kind, enabled=False)))
    self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    self.first_step_s = self.window(1)
    self.one_step_s = self.window(1)

  def window(self, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      train_step(self.model, self.opt, self.x, self.y, self.row["method"], 8 / 255, 0.2,
                 self.autocast)
    self.sync()
    return (time.perf_counter() - t) / steps


def bench(rows: list[dict], windows: int, steps: int, device: str,
          min_window_s: float = 0.0) -> list[dict]:
  """As the JAX side: rows of one (model, batch, dtype) have their windows interleaved. Rows of
  methods this baseline does not implement come back as None."""
  groups: dict[tuple, list[int]] = {}
  for i, row in enumerate(rows):
    groups.setdefault((row["model"], row["batch"], row["dtype"]), []).append(i)
  results: list[dict | None] = [None for _ in rows]  # None: a method this baseline lacks
  for idx in groups.values():
    idx = [i for i in idx if rows[i]["method"] in METHODS]
    if not idx:
      continue
    timers = [StepTimer(rows[i], device) for i in idx]
    n_steps = [max(steps, math.ceil(min_window_s / max(t.one_step_s, 1e-9))) for t in timers]
    times = [[] for _ in timers]
    for _ in range(windows):
      for t, k, ts in zip(timers, n_steps, times):
        ts.append(t.window(k))
    for i, t, k, ts in zip(idx, timers, n_steps, times):
      step_s = statistics.median(ts)
      results[i] = {**rows[i], "framework": "torch", "torch": torch.__version__, "device": device,
                    "step_s": step_s, "images_per_s": rows[i]["batch"] / step_s,
                    "first_step_s": t.first_step_s, "threads": torch.get_num_threads(),
                    "steps": k, "windows": windows, "window_step_s": ts}
  return results


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--rows", required=True, help="JSON list of {model, method, batch, dtype}")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--min_window_s", type=float, default=0.0)
  args = p.parse_args()
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  np.random.seed(0)
  rows = json.loads(args.rows)
  out = bench(rows, args.windows, args.steps, device, args.min_window_s)
  print("RESULTS_JSON " + json.dumps(out))


if __name__ == "__main__":
  main()
