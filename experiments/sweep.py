"""Run a grid of trainings: config x method x eps x seed, resumable, spread over workers.

  python experiments/sweep.py --config=configs/fashion_mnist.py --methods=fgsm,gradalign \
      --eps=32,64 --seeds=0,1 --root=runs/fmnist --workers=2 [--extra=num_epochs=2]

Each run is `python -m fastadv_jax.main --config=<config>:<method>,eps=<e>,seed=<s>[,extra]
--workdir=<root>/<method>_eps<e>_s<s>`. Finished runs (results.json present) are skipped; an
interrupted one resumes from its checkpoint when the sweep is started again. `--workers` runs
that many at once: on a CPU each worker is pinned to one XLA thread (two single-threaded
processes gave about twice the throughput of one two-threaded one on 2 cores, as measured on this project's machines); on a
multi-GPU host, `--gpus_per_worker` gives each worker its own CUDA_VISIBLE_DEVICES. `--shard=i/n`
takes every n-th run, to split one grid over several machines.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_name(method: str, eps: str, seed: str) -> str:
  return f"{method}_eps{eps}_s{seed}"


def plan(args) -> list[tuple[str, list[str], dict]]:
  """[(workdir, command, extra env)] for the runs of this shard that are not finished."""
  shard, n_shards = (int(v) for v in args.shard.split("/"))
  # Seed-major order: a sweep cut short still has every method at the seeds it reached.
  grid = [(m, e, s) for s, e, m in itertools.product(args.seeds.split(","), args.eps.split(","),
                                                     method_names(args.methods, args.plugins))]
  runs = []
  for i, (method, eps, seed) in enumerate(grid):
    if i % n_shards != shard:
      continue
    workdir = os.path.join(args.root, run_name(method, eps, seed))
    if os.path.exists(os.path.join(workdir, "results.json")):
      continue
    arg = ",".join([method, f"eps={eps}", f"seed={seed}"] + ([args.extra] if args.extra else []))
    cmd = [sys.executable, "-m", "fastadv_jax.main", f"--config={args.config}:{arg}",
           f"--workdir={workdir}"] + ([f"--config.plugins={args.plugins}"] if args.plugins else [])
    runs.append((workdir, cmd, {}))
  return runs


def method_names(spec: str, plugin_modules: str = "") -> list[str]:
  """'all' = every preset of the method registry (plugins included) except plain training;
  else a comma list."""
  if spec == "all":
    from fastadv_jax import methods  # pylint: disable=import-outside-toplevel
    from fastadv_jax.runtime import plugins
    plugins.load_entry_points()
    plugins.load(plugin_modules)
    return [p for p in methods.presets() if p != "standard"]
  return spec.split(",")


def worker_env(slot: int, args) -> dict:
  env = dict(os.environ)
  if args.gpus_per_worker > 0:
    first = slot * args.gpus_per_worker
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + g) for g in range(args.gpus_per_worker))
  elif args.workers > 1:  # CPU: one XLA thread per worker (the JAX FAQ's single-thread flags)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
  return env


def pinned(cmd: list[str], slot: int, args) -> list[str]:
  """On CPU with several workers, pin worker `slot` to one core (Linux taskset, if present)."""
  if args.gpus_per_worker == 0 and args.workers > 1 and shutil.which("taskset"):
    return ["taskset", "-c", str(slot % (os.cpu_count() or 1))] + cmd
  return cmd


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--methods", required=True,
                 help="comma-separated method presets, or 'all' (every registry preset)")
  p.add_argument("--eps", required=True, help="comma-separated, in 1/255")
  p.add_argument("--seeds", default="0")
  p.add_argument("--root", required=True)
  p.add_argument("--extra", default="", help="more key=value pairs for the config argument")
  p.add_argument("--plugins", default="", help="modules registering methods or models, passed "
                 "to every run as --config.plugins (comma-separated)")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--gpus_per_worker", type=int, default=0)
  p.add_argument("--shard", default="0/1")
  p.add_argument("--dry_run", action="store_true")
  args = p.parse_args(argv)
  runs = plan(args)
  print(f"{len(runs)} run(s) to do under {args.root}", flush=True)
  if args.dry_run:
    for workdir, cmd, _ in runs:
      print(" ".join(cmd))
    return 0
  pending, active, failed = list(runs), {}, []
  while pending or active:
    for slot in range(args.workers):
      if slot not in active and pending:
        workdir, cmd, _ = pending.pop(0)
        os.makedirs(workdir, exist_ok=True)
        log = open(os.path.join(workdir, "log.txt"), "a")
        active[slot] = (workdir, subprocess.Popen(pinned(cmd, slot, args), cwd=ROOT, stdout=log, stderr=log,
                                                  env=worker_env(slot, args)), time.time(), log)
        print(f"[start] {workdir}", flush=True)
    time.sleep(1.0)
    for slot, (workdir, proc, t0, log) in list(active.items()):
      if proc.poll() is not None:
        log.close()
        status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}, see log.txt)"
        if proc.returncode != 0:
          failed.append(workdir)
        print(f"[{status}] {workdir} in {time.time() - t0:.0f}s", flush=True)
        del active[slot]
  print(f"{len(runs) - len(failed)} finished, {len(failed)} failed", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
