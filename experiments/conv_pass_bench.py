"""Per-convolution profile of a model's training step: each convolution's forward pass, input
gradient and weight gradient timed alone, under each XLA:CPU convolution backend and PyTorch.

  .venv/bin/python experiments/conv_pass_bench.py --model=preact_resnet18 --batch=128 \
      --torch_python=.venv-torch/bin/python --out=experiments/bench/conv_passes_resnet18_b128.json

Why: a training step's time is mostly its convolutions, and XLA:CPU can hand each one to a
different library: YNNPACK (`__ynn_fusion`, XLA's default for convolutions today), its own Eigen
kernels (YNNPACK's convolutions off), or oneDNN (`--xla_cpu_experimental_onednn_custom_call`).
Which is fastest differs between the forward pass, the input gradient and the weight gradient,
and between shapes, so this times every pass of every distinct convolution of the model, under
each backend in its own process (XLA reads XLA_FLAGS once per process), beside PyTorch's
`conv2d` / `convolution_backward` on the same shapes. The sum over the model's convolutions,
weighted by how often each shape occurs, is what the backend would cost the step.

The convolutions are read off the model's own forward pass (jaxpr), so the shapes are exactly
those the training step runs. Prints a table; `--out` keeps every time as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# XLA_FLAGS per backend. "ynn" is XLA's default (every convolution that YNNPACK supports goes
# to it); "eigen" removes convolutions from YNNPACK's list and leaves its dots and reductions.
BACKENDS = {
    "ynn": "",
    "eigen": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
    "onednn": ("--xla_cpu_experimental_onednn_custom_call=true "
               "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"),
}
PASSES = ("forward", "input_grad", "weight_grad")


def conv_shapes(model_name: str, batch: int) -> list[dict]:
  """The distinct convolutions of one forward pass of `model_name`, with their multiplicity."""
  import jax
  import jax.numpy as jnp

  from fastadv_jax import benchmark
  from fastadv_jax.training import model_config
  c = benchmark.row_config(model_name, "standard", batch, "float32")
  model = model_config.create_model(c, 10)
  shape = (batch,) + benchmark.input_shape(model_name)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + shape[1:]), train=False)
  jaxpr = jax.make_jaxpr(lambda x: model.apply(variables, x, train=True,
                                              mutable=["batch_stats"]))(jnp.zeros(shape))
  found: dict[str, dict] = {}

  def visit(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        p = eqn.params
        dn = p["dimension_numbers"]
        if (dn.lhs_spec, dn.rhs_spec, dn.out_spec) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
          raise ValueError(f"conv_pass_bench expects NHWC/HWIO convolutions, got {dn}")
        spec = {"x": list(eqn.invars[0].aval.shape), "w": list(eqn.invars[1].aval.shape),
                "stride": list(p["window_strides"]), "padding": [list(q) for q in p["padding"]]}
        key = json.dumps(spec)
        found.setdefault(key, {**spec, "count": 0})["count"] += 1
      for value in eqn.params.values():  # nested jaxprs (pjit, custom_vjp, ...)
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, "jaxpr", sub)
          if hasattr(sub, "eqns"):
            visit(sub)

  visit(jaxpr.jaxpr)
  return list(found.values())


def _flops(spec: dict) -> float:
  n, h, w, _ = spec["x"]
  kh, kw, ci, co = spec["w"]
  ho = (h + sum(spec["padding"][0]) - kh) // spec["stride"][0] + 1
  wo = (w + sum(spec["padding"][1]) - kw) // spec["stride"][1] + 1
  return 2.0 * n * ho * wo * kh * kw * ci * co  # the same for each of the three passes


def _time(fn, args, reps: int, min_s: float) -> float:
  """Median seconds of one call over `reps` windows of at least `min_s` seconds."""
  out = fn(*args)
  _block(out)
  t = time.perf_counter()
  _block(fn(*args))
  one = max(time.perf_counter() - t, 1e-6)
  k = max(1, int(min_s / one))
  windows = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(k):
      out = fn(*args)
    _block(out)
    windows.append((time.perf_counter() - t) / k)
  return statistics.median(windows)


def _block(out):
  if hasattr(out, "block_until_ready"):
    out.block_until_ready()


def time_jax(specs: list[dict], reps: int, min_s: float) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  rows = []
  rng = np.random.default_rng(0)
  for spec in specs:
    x = jnp.asarray(rng.standard_normal(spec["x"]), jnp.float32)
    w = jnp.asarray(rng.standard_normal(spec["w"]), jnp.float32)

    def conv(x, w, spec=spec):
      return jax.lax.conv_general_dilated(x, w, spec["stride"], spec["padding"],
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jnp.asarray(rng.standard_normal(jax.eval_shape(conv, x, w).shape), jnp.float32)
    fns = {"forward": jax.jit(conv),
           "input_grad": jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
           "weight_grad": jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])}
    args = {"forward": (x, w), "input_grad": (x, w, g), "weight_grad": (x, w, g)}
    times = {p: _time(fns[p], args[p], reps, min_s) for p in PASSES}
    rows.append({**spec, "seconds": times})
  return rows


def time_torch(specs: list[dict], reps: int, min_s: float) -> list[dict]:
  import torch
  torch.manual_seed(0)
  rows = []
  for spec in specs:
    n, h, w_, ci = spec["x"]
    kh, kw, _, co = spec["w"]
    pad = (spec["padding"][0][0], spec["padding"][1][0])
    x = torch.randn(n, ci, h, w_)
    w = torch.randn(co, ci, kh, kw)
    y = torch.nn.functional.conv2d(x, w, None, spec["stride"], pad)
    g = torch.randn_like(y)

    def backward(mask, x=x, w=w, g=g, spec=spec, pad=pad):
      return torch.ops.aten.convolution_backward(g, x, w, None, spec["stride"], list(pad), [1, 1],
                                                 False, [0, 0], 1, mask)

    with torch.no_grad():
      fns = {"forward": lambda x=x, w=w, spec=spec, pad=pad: torch.nn.functional.conv2d(
                 x, w, None, spec["stride"], pad),
             "input_grad": lambda: backward([True, False, False]),
             "weight_grad": lambda: backward([False, True, False])}
      times = {p: _time(fns[p], (), reps, min_s) for p in PASSES}
    rows.append({**spec, "seconds": times})
  return rows


def _child(argv: list[str], flags: str | None, payload: dict, python: str) -> list[dict]:
  env = dict(os.environ)
  if flags is not None:
    env["XLA_FLAGS"] = flags
    env["FASTADV_XLA_CPU_FLAGS"] = "0"  # exactly these flags, not the library's default
  out = subprocess.run([python, os.path.abspath(__file__), *argv, "--child",
                        json.dumps(payload)], env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{argv} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def table(specs: list[dict], results: dict[str, list[dict]]) -> str:
  names = list(results)
  head = ["x", "w", "stride", "count", "pass"] + [f"{b} ms" for b in names] + ["best"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  totals = {b: {p: 0.0 for p in PASSES} for b in names}
  for i, spec in enumerate(specs):
    for p in PASSES:
      ms = {b: results[b][i]["seconds"][p] * 1e3 for b in names}
      for b in names:
        totals[b][p] += ms[b] * spec["count"]
      best = min(ms, key=ms.get)
      lines.append("| " + " | ".join(
          ["x".join(map(str, spec["x"])), "x".join(map(str, spec["w"])),
           str(spec["stride"][0]), str(spec["count"]), p]
          + [f"{ms[b]:.2f}" for b in names] + [best]) + " |")
  for p in PASSES + ("all",):
    tot = {b: (sum(totals[b].values()) if p == "all" else totals[b][p]) for b in names}
    lines.append("| total | | | | " + p + " | " + " | ".join(f"{tot[b]:.1f}" for b in names)
                 + f" | {min(tot, key=tot.get)} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="preact_resnet18")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--backends", default=",".join(BACKENDS))
  parser.add_argument("--torch_python", default=None)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--min_window_s", type=float, default=0.3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--torch", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child is not None:
    payload = json.loads(args.child)
    fn = time_torch if args.torch else time_jax
    print(json.dumps(fn(payload["specs"], args.reps, args.min_window_s)))
    return

  specs = conv_shapes(args.model, args.batch)
  common = ["--reps", str(args.reps), "--min_window_s", str(args.min_window_s)]
  results = {}
  for b in args.backends.split(","):
    if b not in BACKENDS:
      parser.error(f"--backends: unknown {b!r}; choose from {', '.join(BACKENDS)}")
    results[b] = _child(common, BACKENDS[b], {"specs": specs}, sys.executable)
  if args.torch_python:
    results["pytorch"] = _child(common + ["--torch"], None, {"specs": specs}, args.torch_python)
  for spec in specs:
    spec["gflop_per_pass"] = _flops(spec) / 1e9
  print(f"{args.model}, batch {args.batch}: milliseconds per call, median of {args.reps} windows")
  print(table(specs, results))
  if args.out:
    import jax
    with open(args.out, "w") as f:
      json.dump({"model": args.model, "batch": args.batch, "specs": specs, "backends": BACKENDS,
                 "results": results, "jax": jax.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, f, indent=1)


if __name__ == "__main__":
  main()
