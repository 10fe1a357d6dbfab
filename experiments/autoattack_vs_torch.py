"""This library's AutoAttack against an independent PyTorch one, on the same weights and points.

For each training workdir: export the weights with fastadv_jax.interop.torch_interop (the exporter users
get), run the JAX AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square at 100 / 100 / 5000) on
the first --n test points, then torchattacks' attacks at the same settings on the export in the
PyTorch environment (experiments/torch_autoattack.py), in the same invocation, one after the
other. Prints per-attack robust counts and times side by side (JAX's split into compilation,
as JAX's monitoring events report it, and the rest), the speed ratios, and both sides' process
CPU time, and writes them with JAX's per-point results to --out.

  .venv/bin/python experiments/autoattack_vs_torch.py --workdirs=runs/default,<other>@200 \
      --torch_python=.venv-torch/bin/python --n=500 --out=experiments/bench/autoattack_vs_torch.json

A workdir may carry its own point count (`path@N`, e.g. a ResNet on fewer points).
--skip_torch runs the JAX side only (to compare two versions of this library on the same
points: --compare_with=<an earlier --out> checks that the per-point results are identical).

--norm=L2 --eps=R compares the L2 threat model instead (radius R, required: a run's eps is an L-inf
one): the standard version's attacks that this library's registry implements in L2
(Component.norms), on both sides; torchattacks has all four in L2.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from fastadv_jax.runtime import xla_cpu

xla_cpu.apply()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fastadv_jax import autoattack, parallel
from fastadv_jax.data import datasets
from fastadv_jax.interop import torch_interop
from fastadv_jax.training import model_config, saved_run

HERE = os.path.dirname(os.path.abspath(__file__))
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_COMPILE = collections.Counter()  # seconds of compilation, by the attack that caused it
_CURRENT = ["probe"]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: _COMPILE.update({_CURRENT[0]: secs})
    if event in _COMPILE_EVENTS else None)


def _cpu_seconds(children: bool = False) -> float:
  r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def attacks_for(norm: str) -> tuple[str, ...]:
  """The standard version's attacks that the registry implements in `norm` (all four in L-inf)."""
  return tuple(a for a in autoattack.VERSIONS["standard"] if norm in autoattack.get(a).norms)


def run_jax(config, variables, x, y, seed: int, batch_size: int, norm: str = "Linf",
            eps: float | None = None) -> tuple:
  """The Evaluator's AutoAttack (same apply_fn, devices and batch size), with each phase call
  marked with its attack so compilation is attributed to it."""
  model = model_config.create_model(config, datasets.NUM_CLASSES[config.dataset],
                                    half_precision=False)
  apply_fn = lambda v, z, _key: model.apply(v, z, train=False)  # noqa: E731
  aa = autoattack.AutoAttack(
      apply_fn, autoattack.output_classes(apply_fn, variables, x.shape[1:]),
      config.eps if eps is None else eps, "standard" if norm == "Linf" else attacks_for(norm),
      batch_size=batch_size or config.eval_batch_size, devices=parallel.local_devices(),
      progress=False, norm=norm)
  phase = aa.device.phase
  cpu_by_attack = collections.Counter()  # process CPU seconds from an attack's first call on
  mark = [_cpu_seconds()]

  def marked(*args):
    name = next(a for a in args if isinstance(a, str))  # the attack's name
    if name != _CURRENT[0]:
      now = _cpu_seconds()
      cpu_by_attack[_CURRENT[0]] += now - mark[0]
      _CURRENT[0], mark[0] = name, now
    return phase(*args)

  aa.device.phase = marked
  _COMPILE.clear()
  _CURRENT[0] = "probe"
  cpu, start = _cpu_seconds(), time.perf_counter()
  mark[0] = cpu
  res = aa.run(variables, np.asarray(x, np.float32) / 255.0, y, seed)
  cpu_by_attack[_CURRENT[0]] += _cpu_seconds() - mark[0]
  return (res, time.perf_counter() - start, _cpu_seconds() - cpu, dict(_COMPILE),
          dict(cpu_by_attack))


def compare(workdir: str, n: int, torch_python: str, tmp: str, seed: int, skip_torch: bool,
            batch_size: int, norm: str = "Linf", eps: float | None = None) -> dict:
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

  res, jax_seconds, jax_cpu, compile_s, cpu_s = run_jax(config, variables, x, y, seed,
                                                        batch_size, norm, eps)
  for r in res.records:
    print(f"jax   {r.name}: {r.attacked} -> {r.robust_after} robust ({r.seconds:.1f} s, "
          f"compilation {compile_s.get(r.name, 0.0):.1f} s, CPU {cpu_s.get(r.name, 0.0):.1f} s)",
          flush=True)
  row = {
      "workdir": workdir, "model": config.model, "method": config.method, "eps": eps,
      "iteration": step, "n": n,
      "jax": {"clean_acc": res.clean_accuracy, "autoattack_acc": res.accuracy,
              "robust_counts": {r.name: r.robust_after for r in res.records},
              "seconds": {r.name: round(r.seconds, 2) for r in res.records},
              "compile_seconds": {k: round(v, 2) for k, v in compile_s.items()},
              "total_seconds": round(jax_seconds, 2),
              "total_compile_seconds": round(sum(compile_s.values()), 2),
              "cpu_seconds": round(jax_cpu, 2),
              "cpu_seconds_by_attack": {k: round(v, 2) for k, v in cpu_s.items()},
              "warnings": res.warnings,
              "robust": res.robust.tolist(), "broken_by": res.broken_by.tolist(),
              "x_adv_sha256": hashlib.sha256(np.ascontiguousarray(res.x_adv)).hexdigest()},
  }
  if norm != "Linf":  # L-inf rows keep their fields as they were
    row.update(norm=norm, attacks=list(attacks),
               skipped=[a for a in autoattack.VERSIONS["standard"] if a not in attacks])
  if skip_torch:
    return row
  torch_out = os.path.join(export_dir, "torch.json")
  cpu = _cpu_seconds(children=True)
  subprocess.run([torch_python, os.path.join(HERE, "torch_autoattack.py"),
                  f"--export_dir={export_dir}", f"--data={points}", f"--eps={eps}",
                  f"--seed={seed}", f"--out={torch_out}"]
                 + ([] if norm == "Linf" else [f"--norm={norm}", f"--attacks={','.join(attacks)}"]),
                 check=True)
  torch_cpu = _cpu_seconds(children=True) - cpu
  with open(torch_out) as f:
    th = json.load(f)
  both = np.asarray(th["robust"]) & res.robust
  th_seconds = {r["name"]: r["seconds"] for r in th["records"]}
  row.update({
      "torch": {"clean_acc": th["clean_acc"], "autoattack_acc": th["autoattack_acc"],
                "robust_counts": {r["name"]: r["robust_after"] for r in th["records"]},
                "seconds": {r["name"]: round(r["seconds"], 2) for r in th["records"]},
                "total_seconds": round(th["total_seconds"], 2), "cpu_seconds": round(torch_cpu, 2),
                "versions": {"torch": th["torch"], "torchattacks": th["torchattacks"]}},
      "speedup": {**{r.name: round(th_seconds[r.name] / max(r.seconds, 1e-9), 2)
                     for r in res.records},
                  "total": round(th["total_seconds"] / jax_seconds, 2),
                  "total_without_compilation": round(
                      th["total_seconds"] / max(jax_seconds - sum(compile_s.values()), 1e-9), 2),
                  "cpu": round(torch_cpu / max(jax_cpu, 1e-9), 2)},
      "robust_in_both": int(both.sum()),
      "robust_only_jax": int((res.robust & ~np.asarray(th["robust"])).sum()),
      "robust_only_torch": int((~res.robust & np.asarray(th["robust"])).sum()),
  })
  return row


def table(rows: list[dict]) -> str:
  """A markdown table: per attack, JAX's seconds (compilation), PyTorch's, and the ratio."""
  names = list(rows[0]["jax"]["seconds"])
  lines = ["| model (points) | side | " + " | ".join(names) + " | total | CPU s | acc |",
           "|---|---|" + "---|" * (len(names) + 3)]
  for r in rows:
    j, c = r["jax"], r["jax"]["compile_seconds"]
    lines.append(f"| {r['model']} {os.path.basename(os.path.normpath(r['workdir']))} ({r['n']}) "
                 "| JAX (compile) | " + " | ".join(
                     f"{j['seconds'][a]:.1f} ({c.get(a, 0.0):.1f})" for a in names)
                 + f" | **{j['total_seconds']:.1f}** ({j['total_compile_seconds']:.1f}) | "
                 f"{j['cpu_seconds']:.0f} | {100 * j['autoattack_acc']:.1f} % |")
    if "torch" in r:
      t = r["torch"]
      lines.append("| | PyTorch | " + " | ".join(f"{t['seconds'][a]:.1f}" for a in names)
                   + f" | **{t['total_seconds']:.1f}** | {t['cpu_seconds']:.0f} | "
                   f"{100 * t['autoattack_acc']:.1f} % |")
      lines.append("| | speed-up | " + " | ".join(f"{r['speedup'][a]:.2f}x" for a in names)
                   + f" | **{r['speedup']['total']:.2f}x** "
                   f"({r['speedup']['total_without_compilation']:.2f}x without compilation) | "
                   f"{r['speedup']['cpu']:.2f}x | |")
  return "\n".join(lines)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdirs", required=True,
                  help="comma-separated training workdirs, each optionally path@N (points)")
  ap.add_argument("--torch_python", default=".venv-torch/bin/python")
  ap.add_argument("--n", type=int, default=1000, help="points per workdir without @N")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=0, help="0: the run's eval_batch_size")
  ap.add_argument("--skip_torch", action="store_true", help="the JAX side only")
  ap.add_argument("--compare_with", default="",
                  help="an earlier --out: check that JAX's per-point results are the same")
  ap.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
  ap.add_argument("--eps", type=float, default=None,
                  help="the radius (default: each run's eps; required with --norm=L2)")
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  if args.norm != "Linf" and args.eps is None:
    ap.error(f"--eps: give the {args.norm} radius (a run's eps is an L-inf one)")
  skipped = [a for a in autoattack.VERSIONS["standard"] if a not in attacks_for(args.norm)]
  if skipped:
    print(f"{', '.join(skipped)}: no {args.norm} version in this library's registry, left out "
          "on both sides", flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for spec in args.workdirs.split(","):
      wd, _, n = spec.partition("@")
      rows.append(compare(wd, int(n) if n else args.n, args.torch_python, tmp, args.seed,
                          args.skip_torch, args.batch_size, args.norm, args.eps))
      r = rows[-1]
      jax_ = r["jax"]
      line = (f"{wd}: AutoAttack jax {100 * jax_['autoattack_acc']:.1f} % "
              f"({jax_['total_seconds']:.0f} s, {jax_['total_compile_seconds']:.0f} s of it "
              f"compilation, CPU {jax_['cpu_seconds']:.0f} s)")
      if "torch" in r:
        torch_ = r["torch"]
        line += (f" vs torch {100 * torch_['autoattack_acc']:.1f} % "
                 f"({torch_['total_seconds']:.0f} s, CPU {torch_['cpu_seconds']:.0f} s): "
                 f"{r['speedup']['total']:.2f}x")
      print(line, flush=True)
  out = {"rows": rows, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                   "jax": jax.__version__, "platform": platform.platform(),
                                   "load_average": os.getloadavg()}}
  print(table(rows))
  if args.compare_with:
    with open(args.compare_with) as f:
      before = {(r["workdir"], r["n"]): r for r in json.load(f)["rows"]}
    for r in rows:
      b = before.get((r["workdir"], r["n"]))
      if b is not None:
        same = (b["jax"]["robust"] == r["jax"]["robust"]
                and b["jax"]["broken_by"] == r["jax"]["broken_by"])
        same_adv = b["jax"].get("x_adv_sha256") == r["jax"]["x_adv_sha256"]
        print(f"{r['workdir']}: per-point results {'identical' if same else 'DIFFER'}, "
              f"adversarial examples {'identical' if same_adv else 'differ'} to "
              f"{args.compare_with}; JAX {b['jax']['total_seconds']:.1f} s -> "
              f"{r['jax']['total_seconds']:.1f} s, CPU {b['jax']['cpu_seconds']:.0f} -> "
              f"{r['jax']['cpu_seconds']:.0f} s")
        for a, secs in r["jax"]["seconds"].items():
          print(f"  {a}: {b['jax']['seconds'][a]:.1f} s (compilation "
                f"{b['jax']['compile_seconds'].get(a, 0.0):.1f} s, CPU "
                f"{b['jax'].get('cpu_seconds_by_attack', {}).get(a, float('nan')):.1f} s) -> "
                f"{secs:.1f} s ({r['jax']['compile_seconds'].get(a, 0.0):.1f} s, "
                f"{r['jax']['cpu_seconds_by_attack'].get(a, float('nan')):.1f} s)")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
