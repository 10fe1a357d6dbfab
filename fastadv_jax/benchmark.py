"""Training-step and evaluation throughput, on CPU, GPU or TPU, beside a PyTorch baseline.

  python -m fastadv_jax.benchmark --models=small_cnn,cnn --methods=all --batches=128,512 \
      --dtypes=float32,bfloat16 --out=bench.json [--torch_python=.venv-torch/bin/python]

For every (model, method, batch, dtype) row: compile time (first call minus a steady step),
steady-state images/s (median over `--windows` timed windows of at least `--steps` steps and
`--min_window_s` seconds, each closed by block_until_ready; the windows of rows of one model,
batch and dtype are interleaved), the step's FLOPs and memory from XLA's analyses of the compiled
step, the process's memory so far (peak device bytes on GPU/TPU, RSS on CPU), and the cost
relative to FGSM. The batch is already on the device (the input pipeline is measured by the
training loop, not here). With
`--torch_python`, experiments/torch_baseline.py times the same rows in that interpreter,
minutes apart on the same machine, and each row gets its JAX/PyTorch speed ratio.
`--eval_points N` also times PGD-50-10 evaluation of N points per model.
"""
from __future__ import annotations

if __name__ == "__main__":  # the command line: quiet before jax loads (cli_logging's docstring)
  from fastadv_jax.runtime import cli_logging as _quiet
  _quiet.quiet_startup()

import argparse  # noqa: E402  pylint: disable=wrong-import-position
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import resource

from fastadv_jax import cli, methods, models, parallel
from fastadv_jax.configs import common, default
from fastadv_jax.runtime import plugins, xla_cpu
from fastadv_jax.training import evaluation, model_config, pass_costs, timing, train_step
from fastadv_jax.training import train_state as ts

# Every preset of the method registry, plus variants of GradAlign: each the `gradalign` preset
# with these config fields. gradalign_full: through g1 too; gradalign_double / gradalign_jvp:
# its derivative forced to one formulation (the `gradalign` row uses the config default, auto).
_VARIANT_FIELDS = {
    "gradalign_full": {"grad_align_backprop_g1": True},
    "gradalign_double": {"grad_align_derivative": "double_backprop"},
    "gradalign_jvp": {"grad_align_derivative": "jvp"},
}
GRADALIGN_VARIANTS = tuple(_VARIANT_FIELDS)
# The models' sizes in the benchmark's rows, by model (others as the config has them): the
# small CNN is timed at --width filters, the paper's CNN at 4.
_ROW_MODEL_ARGS = {"small_cnn": lambda width: {"n_filters": width},
                   "cnn": lambda width: {"n_filters": 4}}


def method_rows() -> tuple[str, ...]:
  """Every preset of the live method registry (plugins included), then the GradAlign variants."""
  return tuple(methods.presets()) + GRADALIGN_VARIANTS
def input_shape(model_name: str) -> tuple[int, int, int]:
  """The (H, W, C) a model is timed on: its record's (the data it is usually trained on)."""
  return tuple(models.get(model_name).input_shape)


def row_config(model: str, method: str, batch: int, dtype: str, width: int = 16):
  """A default config set up for one benchmark row (eps 8/255, lambda 0.2 as CIFAR-10)."""
  c = default.get_config()
  c.model, c.batch_size, c.half_precision = model, batch, dtype == "bfloat16"
  if model in _ROW_MODEL_ARGS:
    c.model_args[model].update(_ROW_MODEL_ARGS[model](width))
  c.eps = 8 / 255
  preset = "gradalign" if method in _VARIANT_FIELDS else method
  common.apply_preset(c, preset)
  common.finish(c, preset, {}, gradalign_lambda=lambda eps: 0.2)
  c.grad_align_backprop_g1 = False
  c.update(_VARIANT_FIELDS.get(method, {}))
  return c


def _memory(device) -> dict:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_device_mb": stats["peak_bytes_in_use"] / 2**20}
  try:
    import psutil
    return {"rss_mb": psutil.Process().memory_info().rss / 2**20}
  except ImportError:
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _compiled_costs(c, model_name: str) -> dict:
  """FLOPs and memory of one step's single-device program, from XLA's own analyses.

  Unlike the process-wide peak memory, these belong to this row alone: the step's temporary
  buffers plus its arguments and outputs (train state and batch)."""
  out = {"flops_per_step": None}
  try:
    model = model_config.create_model(c, 10)
    state = ts.create_train_state(c, model, jax.random.key(0), input_shape(model_name), 1000,
                                  n_examples=c.batch_size)
    fn = jax.jit(train_step.make_train_step(c, model, 1000, axis_name=None))
    batch = {"image": jnp.zeros((c.batch_size,) + input_shape(model_name), jnp.uint8),
             "label": jnp.zeros((c.batch_size,), jnp.int32),
             "index": jnp.arange(c.batch_size, dtype=jnp.int32)}
    compiled = fn.lower(state, batch, jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops"):
      out["flops_per_step"] = float(cost["flops"])
    mem = compiled.memory_analysis()
    if mem is not None:
      out["xla_temp_mb"] = mem.temp_size_in_bytes / 2**20
      out["xla_args_outputs_mb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                    - mem.alias_size_in_bytes) / 2**20
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def window_steps(steps: int, one_step_s: float, min_window_s: float) -> int:
  """At least `steps` steps per timed window, and enough to fill `min_window_s` seconds."""
  return max(steps, math.ceil(min_window_s / max(one_step_s, 1e-9)))


def random_batch(model_name: str, batch: int, n_devices: int) -> tuple[np.ndarray, np.ndarray]:
  """The timed batch (uint8 images, labels), split over the devices: the same for every row and
  pass timer of a group."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n_devices, batch // n_devices) + input_shape(model_name),
                        dtype=np.uint8)
  labels = rng.integers(0, 10, (n_devices, batch // n_devices)).astype(np.int32)
  return images, labels


class StepTimer:
  """One benchmark row, compiled and warmed up; `window()` times `steps` steps, synchronised."""

  def __init__(self, model_name: str, method: str, batch: int, dtype: str, width: int = 16):
    c = row_config(model_name, method, batch, dtype, width)
    devices = jax.local_devices()
    n = len(devices)
    model = model_config.create_model(c, 10, bn_axis_name=parallel.AXIS)
    # Per-example state (FGSM-PGI's buffers) for as many examples as one batch holds.
    state = ts.create_train_state(c, model, jax.random.key(0), input_shape(model_name), 1000,
                                  n_examples=batch)
    self.step = parallel.pmap_train_step(train_step.make_train_step(c, model, 1000))
    self.state = parallel.replicate(state, n)
    images, labels = random_batch(model_name, batch, n)
    index = np.arange(batch, dtype=np.int32).reshape(n, batch // n)
    self.batch_dev = {"image": jax.device_put(images), "label": jax.device_put(labels),
                      "index": jax.device_put(index)}
    self.key = jax.random.key(1)
    self.row = {"model": model_name, "method": method, "batch": batch, "dtype": dtype,
                "framework": "jax"}
    first = self.window(1)
    self.one_step_s = self.window(1)
    self.row.update(compile_s=max(first - self.one_step_s, 0.0),
                    **_compiled_costs(c, model_name), **_memory(devices[0]))

  def compiled_text(self) -> str:
    """The optimised HLO of the step as XLA compiled it (for profiles: experiments/)."""
    return self.step.lower(self.state, self.batch_dev, self.key).compile().as_text()

  def window(self, steps: int) -> float:
    """Seconds per step over `steps` steps, closed by block_until_ready."""
    clock = timing.Stopwatch()
    for _ in range(steps):
      self.state, metrics = self.step(self.state, self.batch_dev, self.key)
    return clock.stop(wait_for=(self.state, metrics)) / steps


def pass_timers(model_name: str, batch: int, dtype: str, width: int = 16
                ) -> list[pass_costs.PassTimer]:
  """One timer per kind of network pass (training/pass_costs.py) on the model of a group's
  rows, with the batch and the initial weights its StepTimers use."""
  c = row_config(model_name, "standard", batch, dtype, width)
  n = jax.local_device_count()
  model = model_config.create_model(c, 10, bn_axis_name=parallel.AXIS)
  state = ts.create_train_state(c, model, jax.random.key(0), input_shape(model_name), 1000)
  variables = jax.tree.map(lambda v: np.broadcast_to(np.asarray(v), (n,) + np.shape(v)),
                           {"params": state.params, "batch_stats": state.batch_stats})
  images, labels = random_batch(model_name, batch, n)
  return [pass_costs.PassTimer(kind, repeats, state.apply_fn, variables,
                               jax.device_put(images), jax.device_put(labels))
          for kind in pass_costs.KINDS for repeats in pass_costs.REPEATS]


def bench_group(specs: list[dict], windows: int, steps: int, width: int = 16,
                min_window_s: float = 0.0, passes: bool = False) -> list[dict]:
  """Times rows that will be compared with each other (e.g. every method of one model and
  batch) with their windows interleaved, so that a slow spell of a shared machine hits all of
  them alike instead of skewing one row's cost relative to FGSM. With `passes`, each kind of
  network pass is timed in the same rotation and every row gets the time its passes imply
  (`add_expected`)."""
  timers = [StepTimer(s["model"], s["method"], s["batch"], s["dtype"], width) for s in specs]
  if passes:
    s = specs[0]
    timers += pass_timers(s["model"], s["batch"], s["dtype"], width)
  n_steps = [window_steps(steps, t.one_step_s, min_window_s) for t in timers]
  times = [[] for _ in timers]
  for _ in range(windows):
    for t, k, out in zip(timers, n_steps, times):
      out.append(t.window(k))
  rows, pass_s = [], {}
  for t, k, out in zip(timers, n_steps, times):
    if isinstance(t, pass_costs.PassTimer):
      pass_s[t.kind, t.repeats] = statistics.median(out)
      continue
    step_s = statistics.median(out)
    rows.append({**t.row, "step_s": step_s, "images_per_s": t.row["batch"] / step_s,
                 "windows": windows, "steps": k, "window_step_s": out})
  if passes:
    add_expected(rows, pass_s, width)
  return rows


def add_expected(rows: list[dict], pass_s: dict[tuple[str, int], float], width: int = 16
                 ) -> None:
  """Each row's passes (methods.base.Passes), the step time they imply (training/pass_costs.py)
  and that time relative to FGSM's, beside the measured cost. Needs the group's `standard`
  row."""
  by_method = {r["method"]: r for r in rows}
  pass_s = pass_costs.marginal_pass_s(pass_s)
  standard_s = by_method["standard"]["step_s"]
  for r in rows:
    c = row_config(r["model"], r["method"], r["batch"], r["dtype"], width)
    reuses = False
    if float(c.grad_align_lambda) > 0 and methods.get(c.method).passes is not None:
      x = jnp.zeros((8,) + input_shape(r["model"]), jnp.float32)
      reuses = pass_costs.reuses_clean_grad(c, x, jnp.zeros((8,), jnp.int32))
    p = pass_costs.step_passes(c, reuses)
    r.update(pass_s=pass_s)
    if p is not None:
      r.update(passes=p._asdict(),
               expected_step_s=pass_costs.expected_step_s(p, pass_s, standard_s))
  fgsm = by_method.get("fgsm", {}).get("expected_step_s")
  for r in rows:
    if fgsm and "expected_step_s" in r:
      r["expected_vs_fgsm"] = r["expected_step_s"] / fgsm


def bench_eval(model_name: str, n_points: int, width: int = 16) -> dict:
  c = row_config(model_name, "standard", 128, "float32", width)
  model = model_config.create_model(c, 10, half_precision=False)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + input_shape(model_name)),
                         train=False)
  ev = evaluation.Evaluator(model, batch_size=min(500, n_points))
  x = np.random.default_rng(0).integers(0, 256, (n_points,) + input_shape(model_name),
                                        dtype=np.uint8)
  y = np.zeros(n_points, np.int32)
  ev.robust_accuracy(variables, x[: ev.batch_size], y[: ev.batch_size], 8 / 255, 50, 1,
                     jax.random.key(0))  # compile
  t = time.perf_counter()
  ev.robust_accuracy(variables, x, y, 8 / 255, 50, 10, jax.random.key(0))
  dt = time.perf_counter() - t
  return {"model": model_name, "eval": "pgd50x10", "points": n_points, "seconds": dt,
          "points_per_s": n_points / dt}


def run_torch(torch_python: str, rows: list[dict], windows: int, steps: int,
              min_window_s: float = 0.0) -> list[dict]:
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "experiments", "torch_baseline.py")
  proc = subprocess.run([torch_python, script, "--rows", json.dumps(rows),
                         f"--windows={windows}", f"--steps={steps}",
                         f"--min_window_s={min_window_s}"], capture_output=True,
                        text=True, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULTS_JSON "):
      return json.loads(line[len("RESULTS_JSON "):])
  raise RuntimeError(f"PyTorch baseline failed ({proc.returncode}): {proc.stderr[-2000:]}")


def measure_peak_flops(n: int = 2048, reps: int = 10) -> float:
  """This machine's attainable float32 FLOP/s: the best of `reps` timed n x n matmuls (2 n^3
  FLOPs each) on one device; the yardstick for each row's fraction of peak."""
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32))
  matmul = jax.jit(lambda u: u @ u)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def add_ratios(rows: list[dict], peak_flops: float | None = None) -> None:
  """cost relative to FGSM (same model/batch/dtype/framework) and JAX/PyTorch speed ratio."""
  key = lambda r: (r["model"], r["batch"], r["dtype"], r["framework"])  # noqa: E731
  fgsm = {key(r): r["step_s"] for r in rows if r["method"] == "fgsm"}
  torch_rows = {(r["model"], r["batch"], r["dtype"], r["method"]): r for r in rows
                if r["framework"] == "torch"}
  for r in rows:
    if key(r) in fgsm:
      r["cost_vs_fgsm"] = r["step_s"] / fgsm[key(r)]
    if peak_flops and r.get("flops_per_step"):
      r["fraction_of_peak"] = r["flops_per_step"] / r["step_s"] / peak_flops
    t = torch_rows.get((r["model"], r["batch"], r["dtype"], r["method"]))
    if r["framework"] == "jax" and t is not None:
      r["jax_over_torch"] = r["images_per_s"] / t["images_per_s"]


def table(rows: list[dict]) -> str:
  lines = ["| model | method | batch | dtype | JAX img/s | JAX vs FGSM | compile s | % of peak "
           "| PyTorch img/s | PyTorch vs FGSM | JAX/PyTorch |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  torch_rows = {(r["model"], r["batch"], r["dtype"], r["method"]): r for r in rows
                if r["framework"] == "torch"}
  for r in rows:
    if r["framework"] != "jax":
      continue
    t = torch_rows.get((r["model"], r["batch"], r["dtype"], r["method"]))
    torch_cells = (f"{t['images_per_s']:.0f} | {t.get('cost_vs_fgsm', float('nan')):.2f}x | "
                   f"{r['jax_over_torch']:.2f}") if t else "- | - | -"
    lines.append(
        f"| {r['model']} | {r['method']} | {r['batch']} | {r['dtype']} | "
        f"{r['images_per_s']:.0f} | {r.get('cost_vs_fgsm', float('nan')):.2f}x | "
        f"{r['compile_s']:.1f} | {_percent(r.get('fraction_of_peak'))} | {torch_cells} |")
  return "\n".join(lines)


def passes_table(rows: list[dict]) -> str:
  """Each method's passes, the cost they imply relative to FGSM, the measured cost, and the
  ratio of the two (above 1: time spent outside the network's passes)."""
  lines = ["| model | batch | dtype | method | fwd | input grad | weight grad | 2nd order "
           "| expected vs FGSM | measured vs FGSM | measured / expected |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["framework"] != "jax" or "expected_vs_fgsm" not in r:
      continue
    p = r["passes"]
    counts = " | ".join(f"{p[k]:g}" for k in pass_costs.KINDS)
    lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['method']} | {counts} | "
                 f"{r['expected_vs_fgsm']:.2f}x | {r['cost_vs_fgsm']:.2f}x | "
                 f"{r['cost_vs_fgsm'] / r['expected_vs_fgsm']:.2f} |")
  groups = {(r["model"], r["batch"], r["dtype"]): r for r in rows if "pass_s" in r}
  for (model, batch, dtype), r in groups.items():
    ms = ", ".join(f"{k} {1e3 * v:.2f}" for k, v in r["pass_s"].items())
    lines.append(f"\n{model}, batch {batch}, {dtype}: one more pass in a program (ms): {ms}")
  return "\n".join(lines)


def _percent(v: float | None) -> str:
  return "-" if v is None else f"{100 * v:.1f}"


def environment() -> dict:
  d = jax.local_devices()[0]
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "jax": jax.__version__, "backend": jax.default_backend(), "device": d.device_kind,
          "n_devices": jax.local_device_count(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


class _OneLineParser(argparse.ArgumentParser):
  """argparse whose errors (an unknown flag, a positional argument) are one line `error: ...`
  and exit 2, as the other command lines' (cli.fail), not a usage block first."""

  def error(self, message: str):  # type: ignore[override]
    cli.fail(f"{message} (see --help)")


def row_specs(args: argparse.Namespace) -> list[dict]:
  """The rows the flags ask for (with --passes, the standard and fgsm rows the comparison needs
  first), checked against the registry and the device count."""
  known = method_rows()
  methods_ = known if args.methods == "all" else tuple(args.methods.split(","))
  unknown = set(methods_) - set(known)
  if unknown:
    raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {known}")
  if args.passes:
    methods_ = tuple(dict.fromkeys(("standard", "fgsm") + methods_))
  specs = [{"model": m, "method": meth, "batch": int(b), "dtype": dt}
           for m in args.models.split(",") for b in args.batches.split(",")
           for dt in args.dtypes.split(",") for meth in methods_]
  for s in specs:
    if s["batch"] % jax.local_device_count():
      raise SystemExit(f"batch {s['batch']} is not divisible by {jax.local_device_count()} devices")
  return specs


def _parser() -> argparse.ArgumentParser:
  p = _OneLineParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--models", default="small_cnn,cnn")
  p.add_argument("--methods", default="all")
  p.add_argument("--batches", default="128")
  p.add_argument("--dtypes", default="float32")
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--steps", type=int, default=10, help="minimum steps per timed window")
  p.add_argument("--min_window_s", type=float, default=0.5,
                 help="more steps per window for fast rows, so that a window lasts this long")
  p.add_argument("--width", type=int, default=16, help="small_cnn width")
  p.add_argument("--eval_points", type=int, default=0)
  p.add_argument("--passes", action="store_true",
                 help="also time each kind of network pass and print every method's cost "
                 "against the cost its passes imply (adds the standard and fgsm rows)")
  p.add_argument("--torch_python", default="")
  p.add_argument("--out", default="bench.json")
  p.add_argument("--plugins", default="", help="modules registering methods or models to "
                 "benchmark too (comma-separated; installed entry points are always loaded)")
  return p


def _set_up(args: argparse.Namespace) -> None:
  """Plugins loaded, the models checked, and their XLA:CPU flags set before JAX's backend
  starts (XLA reads them once per process, so all the models must share them)."""
  try:
    plugins.load_entry_points()
    plugins.load(args.plugins)
  except plugins.PluginError as e:
    raise SystemExit(f"--plugins: {e}") from None
  model_names = args.models.split(",")
  for name in model_names:
    try:
      models.get(name)
    except ValueError as e:
      cli.fail(f"--models: {e}")
  profiles = {json.dumps(models.xla_flags(m), sort_keys=True) for m in model_names}
  if len(profiles) > 1:
    raise SystemExit(f"--models={args.models}: these models train under different XLA:CPU flags "
                     "(models.xla_flags); benchmark them in separate invocations")
  xla_cpu.apply(flags=models.xla_flags(model_names[0]))


def _timed_rows(args: argparse.Namespace, specs: list[dict]) -> list[dict]:
  """The JAX rows, group by group (one model, batch and dtype each), then PyTorch's."""
  groups: dict[tuple, list[dict]] = {}
  for s in specs:
    groups.setdefault((s["model"], s["batch"], s["dtype"]), []).append(s)
  rows = []
  for group in groups.values():
    for r in bench_group(group, args.windows, args.steps, args.width, args.min_window_s,
                         args.passes):
      print(f"jax   {r['model']:16s} {r['method']:15s} b={r['batch']:<5d} {r['dtype']:9s} "
            f"{r['images_per_s']:9.1f} img/s  compile {r['compile_s']:.1f}s", flush=True)
      rows.append(r)
  if args.torch_python:
    for s, t in zip(specs, run_torch(args.torch_python, [dict(s, width=args.width) for s in specs],
                                     args.windows, args.steps, args.min_window_s)):
      if t is None:  # the PyTorch baseline does not implement this method
        continue
      print(f"torch {s['model']:16s} {s['method']:15s} b={s['batch']:<5d} {s['dtype']:9s} "
            f"{t['images_per_s']:9.1f} img/s", flush=True)
      t.pop("width", None)
      rows.append(t)
  return rows


def main(argv=None) -> None:
  args = _parser().parse_args(argv)
  _set_up(args)
  peak = measure_peak_flops()
  print(f"peak: {peak / 1e9:.1f} GFLOP/s (float32 2048 x 2048 matmul, one device)", flush=True)
  rows = _timed_rows(args, row_specs(args))
  add_ratios(rows, peak)
  evals = [bench_eval(m, args.eval_points, args.width) for m in args.models.split(",")
           ] if args.eval_points else []
  result = {"environment": dict(environment(), peak_flops=peak), "rows": rows, "eval": evals,
            "command": " ".join(["python -m fastadv_jax.benchmark"] + (argv or sys.argv[1:]))}
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(table(rows))
  if args.passes:
    print(passes_table(rows))
  for e in evals:
    print(f"eval {e['model']}: PGD-50-10 on {e['points']} points in {e['seconds']:.1f}s "
          f"({e['points_per_s']:.1f} points/s)")
  print(f"wrote {args.out}")

if __name__ == "__main__":
  main()
