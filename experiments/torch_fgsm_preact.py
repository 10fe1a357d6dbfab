"""A weakly robust PreAct ResNet-18 for Fashion-MNIST, trained in PyTorch, for benchmarks that
need ResNet-18 weights with robust points (BENCHMARKS.md, "AutoAttack against torchattacks").

FGSM with a uniform random start (eps 0.1, step 1.25 eps; Wong et al. 2020) on the first 10,000
training images, 2 epochs of batch 128, SGD lr 0.05, momentum 0.9, weight decay 5e-4, seed 0, on
this library's PyTorch PreActResNet18 (fastadv_jax/interop/torch_models.py, one input channel). Much
cheaper on CPU than the JAX trainer's run with its periodic diagnostics, and it goes through the
importer users get. Run with the PyTorch environment:

  .venv/bin/python -c "import numpy as np; from fastadv_jax.data import datasets; \
      t = datasets.load_split('fashion_mnist', 'train', '', False); \
      np.savez('/tmp/fmnist10k.npz', x=t.images[:10000], y=t.labels[:10000])"
  .venv-torch/bin/python experiments/torch_fgsm_preact.py --data=/tmp/fmnist10k.npz \
      --out=/tmp/preact_rn18_state_dict.npz
  .venv/bin/python -m fastadv_jax.torch_import --state_dict=/tmp/preact_rn18_state_dict.npz \
      --config=configs/default.py --config.model=preact_resnet18 --workdir=runs/preact_rn18_torch
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fastadv_jax",
                                "interop"))
import torch_models  # noqa: E402  (self-contained: torch, numpy and the standard library only)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data", required=True, help=".npz with x (N, 28, 28, 1) uint8 and y (N,)")
  ap.add_argument("--out", required=True, help="the state_dict, as .npz")
  ap.add_argument("--epochs", type=int, default=2)
  ap.add_argument("--eps", type=float, default=0.1)
  args = ap.parse_args()
  torch.manual_seed(0)
  data = np.load(args.data)
  x = torch.from_numpy(data["x"].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  y = torch.from_numpy(data["y"].astype(np.int64))
  net = torch_models.PreActResNet18(num_classes=10, in_channels=1)
  opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
  eps, steps = args.eps, len(x) // 128
  for epoch in range(args.epochs):
    perm = torch.randperm(len(x))
    for i in range(steps):
      idx = perm[i * 128:(i + 1) * 128]
      xb, yb = x[idx], y[idx]
      delta = ((torch.rand_like(xb) * 2 - 1) * eps).requires_grad_(True)
      grad, = torch.autograd.grad(F.cross_entropy(net((xb + delta).clamp(0, 1)), yb), delta)
      delta = (delta + 1.25 * eps * grad.sign()).clamp(-eps, eps).detach()
      out = net((xb + delta).clamp(0, 1))
      loss = F.cross_entropy(out, yb)
      opt.zero_grad()
      loss.backward()
      opt.step()
      if i % 20 == 0:
        print(f"epoch {epoch} step {i}: loss {float(loss):.3f}, adversarial accuracy "
              f"{float((out.argmax(1) == yb).float().mean()):.3f}", flush=True)
  net.eval()
  np.savez(args.out, **{k: v.detach().numpy() for k, v in net.state_dict().items()})


if __name__ == "__main__":
  main()
