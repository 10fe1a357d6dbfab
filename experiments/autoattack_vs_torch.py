"""This library's AutoAttack against an independent PyTorch one, on the same weights and points.

For each training workdir: export the weights with fastadv_jax.torch_interop (the exporter users
get), run the JAX AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square at 100 / 100 / 5000) on
the first --n test points, then torchattacks' attacks at the same settings on the export in the
PyTorch environment (experiments/torch_autoattack.py), in the same invocation, one after the
other. Prints per-attack robust counts and times side by side and writes them to --out.

  .venv/bin/python experiments/autoattack_vs_torch.py --workdirs=runs/default,<other> \
      --torch_python=.venv-torch/bin/python --n=1000 --out=experiments/bench/autoattack_vs_torch.json

--norm=L2 --eps=R compares the L2 threat model instead (radius R, required: a run's eps is an L-inf
one): the standard version's attacks that this library's registry implements in L2
(Component.norms), on both sides; torchattacks has all four in L2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from fastadv_jax import xla_cpu

xla_cpu.apply()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fastadv_jax import (autoattack, datasets, evaluation, models, saved_run,  # noqa: E402
                         torch_interop)

HERE = os.path.dirname(os.path.abspath(__file__))


def attacks_for(norm: str) -> tuple[str, ...]:
  """The standard version's attacks that the registry implements in `norm` (all four in L-inf)."""
  return tuple(a for a in autoattack.VERSIONS["standard"] if norm in autoattack.get(a).norms)


def compare(workdir: str, n: int, torch_python: str, tmp: str, seed: int, norm: str = "Linf",
            eps: float | None = None) -> dict:
  config, variables, step = saved_run.load_run(workdir)
  eps = config.eps if eps is None else eps
  attacks = attacks_for(norm)
  test = datasets.load_split(config.dataset, "test", config.data_dir, config.download)
  x, y = test.images[:n], test.labels[:n]
  export_dir = os.path.join(tmp, os.path.basename(os.path.normpath(workdir)))
  torch_interop.write_export(export_dir, config, variables, datasets.NUM_CLASSES[config.dataset],
                             x.shape[1:])
  points = os.path.join(export_dir, "points.npz")
  np.savez(points, x=(x.astype(np.float32) / 255.0).transpose(0, 3, 1, 2), y=y.astype(np.int64))

  model = models.create_model(config, datasets.NUM_CLASSES[config.dataset], half_precision=False)
  ev = evaluation.Evaluator(model, config.eval_batch_size, step_alpha=config.eval_step_alpha,
                           norm=norm)
  start = time.perf_counter()
  res = ev.autoattack(variables, x, y, eps, "standard" if norm == "Linf" else attacks, seed,
                      progress=False)
  jax_seconds = time.perf_counter() - start
  for r in res.records:
    print(f"jax   {r.name}: {r.attacked} -> {r.robust_after} robust ({r.seconds:.1f} s)",
          flush=True)

  torch_out = os.path.join(export_dir, "torch.json")
  subprocess.run([torch_python, os.path.join(HERE, "torch_autoattack.py"),
                  f"--export_dir={export_dir}", f"--data={points}", f"--eps={eps}",
                  f"--seed={seed}", f"--out={torch_out}"]
                 + ([] if norm == "Linf" else [f"--norm={norm}", f"--attacks={','.join(attacks)}"]),
                 check=True)
  with open(torch_out) as f:
    th = json.load(f)
  both = np.asarray(th["robust"]) & res.robust
  row = {
      "workdir": workdir, "model": config.model, "method": config.method, "eps": eps,
      "iteration": step, "n": n,
      "jax": {"clean_acc": res.clean_accuracy, "autoattack_acc": res.accuracy,
              "robust_counts": {r.name: r.robust_after for r in res.records},
              "seconds": {r.name: round(r.seconds, 2) for r in res.records},
              "total_seconds": round(jax_seconds, 2), "warnings": res.warnings},
      "torch": {"clean_acc": th["clean_acc"], "autoattack_acc": th["autoattack_acc"],
                "robust_counts": {r["name"]: r["robust_after"] for r in th["records"]},
                "seconds": {r["name"]: round(r["seconds"], 2) for r in th["records"]},
                "total_seconds": round(th["total_seconds"], 2),
                "versions": {"torch": th["torch"], "torchattacks": th["torchattacks"]}},
      "robust_in_both": int(both.sum()),
      "robust_only_jax": int((res.robust & ~np.asarray(th["robust"])).sum()),
      "robust_only_torch": int((~res.robust & np.asarray(th["robust"])).sum()),
  }
  if norm != "Linf":  # L-inf rows keep their fields as they were
    row.update(norm=norm, attacks=list(attacks),
               skipped=[a for a in autoattack.VERSIONS["standard"] if a not in attacks])
  return row


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdirs", required=True, help="comma-separated training workdirs")
  ap.add_argument("--torch_python", default=".venv-torch/bin/python")
  ap.add_argument("--n", type=int, default=1000)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="")
  ap.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
  ap.add_argument("--eps", type=float, default=None,
                  help="the radius (default: each run's eps; required with --norm=L2)")
  args = ap.parse_args()
  if args.norm != "Linf" and args.eps is None:
    ap.error(f"--eps: give the {args.norm} radius (a run's eps is an L-inf one)")
  skipped = [a for a in autoattack.VERSIONS["standard"] if a not in attacks_for(args.norm)]
  if skipped:
    print(f"{', '.join(skipped)}: no {args.norm} version in this library's registry, left out "
          "on both sides", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for wd in args.workdirs.split(","):
      rows.append(compare(wd, args.n, args.torch_python, tmp, args.seed, args.norm, args.eps))
      r = rows[-1]
      jax_, torch_ = r["jax"], r["torch"]
      print(f"{wd}: AutoAttack jax {100 * jax_['autoattack_acc']:.1f} % "
            f"({jax_['total_seconds']:.0f} s) vs torch {100 * torch_['autoattack_acc']:.1f} % "
            f"({torch_['total_seconds']:.0f} s)", flush=True)
  out = {"rows": rows, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                   "jax": jax.__version__, "platform": platform.platform()}}
  print(json.dumps(out, indent=1))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
