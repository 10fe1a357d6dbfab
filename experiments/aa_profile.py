"""Where this library's AutoAttack spends its time: per attack, per host call (phase, chunk
shape, block length), compilation versus running, and the host-side checks between blocks.

Runs `standard` on the first --n test points of a training workdir with the runner's jitted
phases wrapped in timers (each call waited for, so the times are the calls' own), and prints a
table per attack. Compilation is what JAX's monitoring events report (tracing, lowering, XLA).

  .venv/bin/python experiments/aa_profile.py --workdir=runs/default --n=200
"""
from __future__ import annotations

import argparse
import collections
import os
import time

from fastadv_jax import models
from fastadv_jax.runtime import xla_cpu
from fastadv_jax.training import model_config, saved_run

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--n", type=int, default=200)
  ap.add_argument("--attacks", default="standard")
  ap.add_argument("--batch_size", type=int, default=0, help="0: the run's eval_batch_size")
  args = ap.parse_args()
  config = saved_run.run_config(args.workdir)
  xla_cpu.apply(flags=models.xla_flags(config.model))
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from fastadv_jax import autoattack  # pylint: disable=import-outside-toplevel
  from fastadv_jax.data import datasets

  compile_s = collections.Counter()
  current = ["setup"]
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: compile_s.update({current[0]: secs})
      if event in _COMPILE_EVENTS else None)
  config, variables, _ = saved_run.load_run(args.workdir)
  test = datasets.load_split(config.dataset, "test", config.data_dir, config.download)
  x = test.images[:args.n].astype(np.float32) / 255.0
  y = test.labels[:args.n]
  model = model_config.create_model(config, datasets.NUM_CLASSES[config.dataset],
                                    half_precision=False)
  apply_fn = lambda v, z, _key: model.apply(v, z, train=False)  # noqa: E731
  aa = autoattack.AutoAttack(apply_fn, autoattack.output_classes(apply_fn, variables, x.shape[1:]),
                             config.eps, args.attacks, progress=False,
                             batch_size=args.batch_size or config.eval_batch_size)
  calls = collections.defaultdict(lambda: [0, 0.0])  # (attack, phase, shape, block) -> n, s
  phase = aa.device.phase

  def timed(*args):
    name, ph, block = args[-3:]  # the static arguments: attack, phase, block length
    current[0] = name
    t0 = time.perf_counter()
    out = jax.block_until_ready(phase(*args))
    c = calls[(name, ph, args[1][0].shape[:2], block)]
    c[0] += 1
    c[1] += time.perf_counter() - t0
    return out

  aa.device.phase = timed
  start = time.perf_counter()
  res = aa.run(variables, x, y)
  total = time.perf_counter() - start
  print(f"{args.workdir}: n={args.n} total {total:.1f} s, compile {sum(compile_s.values()):.1f} s,"
        f" robust {res.accuracy:.3f}, CPU {os.times().user + os.times().system:.1f} s")
  for r in res.records:
    in_calls = sum(v[1] for k, v in calls.items() if k[0] == r.name)
    print(f"  {r.name}: {r.attacked} -> {r.robust_after}, {r.seconds:.1f} s (compile "
          f"{compile_s[r.name]:.1f} s, in calls {in_calls:.1f} s, host "
          f"{r.seconds - in_calls:.1f} s)")
    for k, (count, secs) in sorted(calls.items(), key=lambda kv: -kv[1][1]):
      if k[0] == r.name:
        print(f"    {k[1]:6s} shape {k[2]} block {k[3]:3d}: {count:5d} calls {secs:7.2f} s "
              f"({1e3 * secs / count:.1f} ms/call)")


if __name__ == "__main__":
  main()
