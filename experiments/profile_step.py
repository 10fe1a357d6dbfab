"""Where a training step's time goes on XLA:CPU: the JAX profiler's trace of a few steps of one
benchmark row, summed per compiled HLO operation and grouped into kinds.

  .venv/bin/python experiments/profile_step.py --model=preact_resnet18 --method=standard \
      --batch=128 [--steps=2] [--top=12] [--trace_dir=/tmp/fastadv_trace]

XLA:CPU records one trace event per operation it runs (loop fusions, copies, transposes,
YNNPACK fusions, oneDNN calls), but its Eigen convolutions leave none, so on the ResNets the
time not covered by operation events ("untraced") is mostly those convolutions;
experiments/conv_pass_bench.py times them one by one. Events of the two worker threads can
overlap, so on small models the kinds can add up to more than the step (untraced < 0). The
XLA flags are the ones `main` would use for the model (models.xla_flags). Needs TensorFlow's
XPlane protocol buffers (`tensorflow.tsl.profiler.protobuf`; the .venv has them).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import time

from fastadv_jax import models
from fastadv_jax.runtime import xla_cpu


def kind_of(name: str, line: str) -> str:
  """A coarse kind for one compiled operation, from its name and HLO line."""
  m = re.search(r"= \S+ ([a-z\-]+)\(", line)
  opcode = m.group(1) if m else ""
  if "transpose" in name or opcode in ("copy", "transpose"):
    return "layout transposes/copies"
  if "__ynn_fusion" in line:
    return "YNNPACK fusions"
  if "__onednn" in line or "__onednn" in name:
    return "oneDNN calls"
  return {"convolution": "convolutions (XLA's own)", "dot": "dots",
          "all-reduce": "collectives"}.get(opcode, "other fusions (elementwise, reductions)")


def hlo_lines(text: str) -> dict[str, str]:
  """Each HLO instruction's name -> its line in the compiled module."""
  out = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
    if m:
      out[m.group(1)] = line
  return out


def op_times(xplane_path: str) -> collections.Counter:
  """Seconds per operation name, summed over the XLA worker threads of the trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel
  space = xplane_pb2.XSpace()
  with open(xplane_path, "rb") as f:
    space.ParseFromString(f.read())
  times = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      for ev in line.events:
        name = plane.event_metadata[ev.metadata_id].name
        if not name.startswith("ThunkExecutor"):
          times[name] += ev.duration_ps * 1e-12
  return times


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="preact_resnet18")
  p.add_argument("--method", default="standard")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--top", type=int, default=12)
  p.add_argument("--trace_dir", default="/tmp/fastadv_trace")
  args = p.parse_args(argv)
  xla_cpu.apply(flags=models.xla_flags(args.model))  # before the first JAX computation starts the backend
  import jax  # pylint: disable=import-outside-toplevel

  from fastadv_jax import benchmark  # pylint: disable=import-outside-toplevel
  timer = benchmark.StepTimer(args.model, args.method, args.batch, "float32")
  step_s = min(timer.window(args.steps) for _ in range(2))
  started = time.time()
  with jax.profiler.trace(args.trace_dir):
    timer.window(args.steps)
  paths = [path for path in glob.glob(f"{args.trace_dir}/**/*.xplane.pb", recursive=True)
           if os.path.getmtime(path) >= started - 1]
  if not paths:
    sys.exit(f"no trace written under {args.trace_dir}")
  times = op_times(sorted(paths)[-1])
  ops = {k: v / args.steps for k, v in times.items()}
  lines = hlo_lines(timer.compiled_text())
  by_kind = collections.Counter()
  for name, s in ops.items():
    by_kind[kind_of(name, lines.get(name, ""))] += s
  traced = sum(ops.values())
  print(f"{args.model} {args.method} batch {args.batch}: {step_s * 1e3:.1f} ms per step, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print("| kind | ms per step | share of step |\n|---|---|---|")
  for kind, s in by_kind.most_common():
    print(f"| {kind} | {s * 1e3:.1f} | {s / step_s:.0%} |")
  print(f"| untraced (library convolutions, launch) | {(step_s - traced) * 1e3:.1f} | "
        f"{(step_s - traced) / step_s:.0%} |")
  print("\nlargest operations (ms per step):")
  for name, s in sorted(ops.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {s * 1e3:7.1f}  {name}: {lines.get(name, '?').strip()[:150]}")


if __name__ == "__main__":
  main()
