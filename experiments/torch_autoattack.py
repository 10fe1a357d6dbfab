"""The PyTorch reference side of autoattack_vs_torch.py: torchattacks' APGD, APGD-T, FAB-T and
Square at the reference's settings (100 iterations, 9 targets, 5000 queries), composed as
AutoAttack's `standard` version, on a model exported by fastadv_jax.torch_export.

Runs in the PyTorch environment (scripts/setup_bench.sh + `pip install --no-deps
torchattacks==3.5.1 scipy`):
  .venv-torch/bin/python experiments/torch_autoattack.py --export_dir=D --data=points.npz
      --eps=0.1 --out=torch.json
torchattacks' own AutoAttack wrapper is not used: its `standard` runs 10 iterations, not 100.
`--norm=L2` runs torchattacks' L2 versions (the same settings), `--attacks` a subset in order;
an adversarial example outside the ball (L-inf: max |delta|; L2: ||delta||_2) does not count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torchattacks


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--export_dir", required=True)
  ap.add_argument("--data", required=True, help="npz with x (NCHW float32 in [0, 1]) and y")
  ap.add_argument("--eps", type=float, required=True)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--out", required=True)
  ap.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
  ap.add_argument("--attacks", default="apgd-ce,apgd-t,fab-t,square")
  args = ap.parse_args()
  norm = args.norm
  torch.set_num_threads(args.threads)
  sys.path.insert(0, args.export_dir)
  import model as exported  # pylint: disable=import-outside-toplevel  (the export's model.py)
  net = exported.load(args.export_dir)
  with np.load(args.data) as d:
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"]).long()
  n_classes = int(net(x[:1]).shape[1])
  attacks = [
      ("apgd-ce", torchattacks.APGD(net, norm=norm, eps=args.eps, steps=100, n_restarts=1,
                                    loss="ce", seed=args.seed)),
      ("apgd-t", torchattacks.APGDT(net, norm=norm, eps=args.eps, steps=100, n_restarts=1,
                                    n_classes=n_classes, seed=args.seed)),
      ("fab-t", torchattacks.FAB(net, norm=norm, eps=args.eps, steps=100, n_restarts=1,
                                 multi_targeted=True, n_classes=n_classes, seed=args.seed)),
      ("square", torchattacks.Square(net, norm=norm, eps=args.eps, n_queries=5000,
                                     n_restarts=1, seed=args.seed)),
  ]
  wanted = args.attacks.split(",")
  attacks = sorted((a for a in attacks if a[0] in wanted), key=lambda a: wanted.index(a[0]))
  start = time.perf_counter()
  with torch.no_grad():
    robust = (net(x).argmax(1) == y).numpy()
  clean = robust.copy()
  records = []
  for name, attack in attacks:
    t0, todo = time.perf_counter(), np.flatnonzero(robust)
    if todo.size:
      adv = attack(x[todo], y[todo])
      with torch.no_grad():
        still = (net(adv).argmax(1) == y[todo]).numpy()
      d = (adv.detach() - x[todo]).flatten(1)
      size = (d.abs().max(1)[0] if norm == "Linf" else d.norm(dim=1)).numpy()
      tol = 1e-6 if norm == "Linf" else 1e-5 * args.eps  # float32 rounding of the norm
      still |= size > args.eps + tol  # an example outside the ball does not count
      robust[todo[~still]] = False
    records.append({"name": name, "attacked": int(todo.size), "robust_after": int(robust.sum()),
                    "seconds": time.perf_counter() - t0})
    print(f"torch {name}: {todo.size} -> {int(robust.sum())} robust "
          f"({records[-1]['seconds']:.1f} s)", flush=True)
  out = {"clean_acc": float(clean.mean()), "autoattack_acc": float(robust.mean()),
         "robust": robust.tolist(), "records": records,
         "total_seconds": time.perf_counter() - start, "torch": torch.__version__,
         "torchattacks": torchattacks.__version__, "threads": args.threads}
  if norm != "Linf":
    out["norm"] = norm
  with open(args.out, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main()
