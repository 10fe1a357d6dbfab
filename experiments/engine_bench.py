"""Step time and memory of the two engines (fastadv_jax/training/engines.py) on 1 and 8 devices.

  JAX_NUM_CPU_DEVICES=8 .venv/bin/python experiments/engine_bench.py \
      --model=small_cnn --method=fgsm --batch=128 --devices=1,8 --out=experiments/bench/engines.json

For each (devices, engine): the compiled step's memory from XLA's analysis (temporary buffers,
arguments + outputs, per device), the bytes the placed train state holds on this process's
devices (engines.state_bytes), compile time, and the median seconds per step over `--windows`
windows of `--steps` steps (each closed by block_until_ready), the engines' windows
interleaved so that a slow spell of a shared machine hits both alike. On CPU the "devices" are
simulated (XLA_FLAGS / JAX_NUM_CPU_DEVICES share the same cores): the ratio between the engines
is what this measures, not scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastadv_jax.runtime import xla_cpu  # noqa: E402

xla_cpu.apply()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fastadv_jax import parallel  # noqa: E402
from fastadv_jax.training import engines, model_config, timing, train_step
from fastadv_jax.training import train_state as ts  # noqa: E402
from fastadv_jax.benchmark import input_shape, row_config  # noqa: E402


class EngineTimer:
  """One (engine, device count) row: compiled, warmed up; `window(k)` times k steps."""

  def __init__(self, engine_name: str, n_dev: int, model_name: str, method: str, batch: int,
               n_examples: int):
    c = row_config(model_name, method, batch, "float32")
    c.parallelism = engine_name
    model = model_config.create_model(c, 10, bn_axis_name=parallel.AXIS)
    state = ts.create_train_state(c, model, jax.random.key(0), input_shape(model_name), 1000,
                                  n_examples=n_examples)
    self.engine = engines.create(engine_name, jax.local_devices()[:n_dev])
    step = train_step.make_train_step(c, model, 1000)
    rng = np.random.default_rng(0)
    host_batch = {
        "image": rng.integers(0, 256, (batch,) + input_shape(model_name), dtype=np.uint8),
        "label": rng.integers(0, 10, (batch,)).astype(np.int32),
        "index": rng.permutation(n_examples)[:batch].astype(np.int32)}
    self.batch = self.engine.place_batch(host_batch)
    self.state = self.engine.place_state(state)
    self.key = jax.random.key(1)
    self.fn = self.engine.compile_step(step)
    self.row = {"engine": engine_name, "devices": n_dev, "model": model_name, "method": method,
                "batch": batch, "n_examples": n_examples,
                "state_mb_this_process": engines.state_bytes(self.state) / 2**20}
    t = time.perf_counter()
    self.window(1)  # compiles
    first = time.perf_counter() - t
    one = self.window(1)
    self.row["compile_s"] = max(first - one, 0.0)
    # XLA's memory analysis of the same program, compiled once more (not timed).
    program = (self.engine.jit_step(step, self.state) if engine_name == "shard_map"
               else self.fn)
    mem = program.lower(self.state, self.batch, self.key).compile().memory_analysis()
    if mem is not None:
      self.row.update(xla_temp_mb=mem.temp_size_in_bytes / 2**20,
                      xla_args_outputs_mb=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                           - mem.alias_size_in_bytes) / 2**20)

  def window(self, steps: int) -> float:
    clock = timing.Stopwatch()
    for _ in range(steps):
      self.state, metrics = self.fn(self.state, self.batch, self.key)
    return clock.stop(wait_for=(self.state, metrics)) / steps


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="small_cnn")
  p.add_argument("--method", default="fgsm")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--n_examples", type=int, default=1024, help="rows of per-example state")
  p.add_argument("--devices", default="1,8")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default="")
  a = p.parse_args()
  rows = []
  for n_dev in [int(d) for d in a.devices.split(",")]:
    if n_dev > jax.local_device_count():
      raise SystemExit(f"--devices: {n_dev} > the {jax.local_device_count()} local devices "
                       "(set JAX_NUM_CPU_DEVICES)")
    timers = [EngineTimer(e, n_dev, a.model, a.method, a.batch, a.n_examples)
              for e in engines.ENGINES]
    times = [[] for _ in timers]
    for _ in range(a.windows):
      for t, out in zip(timers, times):
        out.append(t.window(a.steps))
    for t, out in zip(timers, times):
      rows.append({**t.row, "step_s": statistics.median(out), "window_step_s": out})
  for r in rows:
    print(f"{r['devices']} device(s) {r['engine']:>9}: {1000 * r['step_s']:7.1f} ms/step, "
          f"compile {r['compile_s']:5.1f} s, state {r['state_mb_this_process']:6.2f} MB, "
          f"XLA temp {r.get('xla_temp_mb', float('nan')):6.2f} MB, args+outputs "
          f"{r.get('xla_args_outputs_mb', float('nan')):6.2f} MB")
  result = {"rows": rows, "argv": sys.argv, "environment": {
      "jax": jax.__version__, "backend": jax.default_backend(), "python": platform.python_version(),
      "machine": platform.machine(), "cpus": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", "")}}
  if a.out:
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
