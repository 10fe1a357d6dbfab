"""Several processes (hosts) as one run, on JAX's own distributed runtime (`jax.distributed`).

Every process runs the same command; `initialize` connects them. After that the pmapped step
spans the devices of all processes (the named axis covers them all, so gradient and BatchNorm
means are global), each process feeds only its rows of every global batch (`process_rows`),
evaluation (PGD, diagnostics, AutoAttack) splits its points over the processes (`point_range`,
`gather_points`), and only process 0 writes metrics, TensorBoard, checkpoints, config.json,
results.json and evaluation outputs or shows a progress bar (`is_main`). Nothing here changes a
single-process run.

How a run is joined, first match wins:
  1. explicit: coordinator address, process count and id (flags of `main` and `evaluate`, in
     distributed_flags.py, or the environment variables FASTADV_COORDINATOR_ADDRESS,
     FASTADV_NUM_PROCESSES, FASTADV_PROCESS_ID);
  2. `auto`: `jax.distributed.initialize()` with no arguments, which detects Cloud TPU pods,
     SLURM and Open MPI (`--distributed=auto`).
On CPU the cross-process collectives use gloo.

Connecting is bounded: if the processes have not all met within `timeout_s` seconds (flag
--distributed_timeout, environment FASTADV_DISTRIBUTED_TIMEOUT, default 120), the process
prints one line naming the coordinator address and exits with code 2. JAX's own deadline
(`initialization_timeout`) ends in an abort with a C++ stack trace from inside the blocking
connect, which no Python code can catch; so a watchdog thread fires first (JAX's deadline is set
further out) and ends the process itself.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jaxlib
import numpy as np
from jax.experimental import multihost_utils

from fastadv_jax.runtime import cli_logging

ENV = ("FASTADV_COORDINATOR_ADDRESS", "FASTADV_NUM_PROCESSES", "FASTADV_PROCESS_ID")
TIMEOUT_ENV = "FASTADV_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
# After connecting, the first training step must complete within this (data loading, the
# first compilation and the first diagnostics included): generous, since a large model's first
# GradAlign step compiles for minutes on a GPU; a launch whose collectives hang ends instead of
# waiting forever.
FIRST_STEP_ENV = "FASTADV_FIRST_STEP_TIMEOUT"
DEFAULT_FIRST_STEP_TIMEOUT_S = 900.0
# Process 0's watchdog waits this much longer: when the coordinator (process 0) goes first, JAX
# aborts the others with a stack dump instead of letting them print their own line.
FIRST_STEP_COORDINATOR_MARGIN_S = 10.0
# A SIGTERM that the process has not acted on within this (a save in progress included) ends it.
SIGTERM_GRACE_S = 120.0
# jaxlib releases whose multi-process runs hang: the processes connect, then the first
# cross-process collective of the training run never completes (seen with jaxlib 0.12.1 on CPU
# with gloo, with pmap and with shard_map; 0.12.0.1 finishes the same command).
BROKEN_MULTIPROCESS_JAXLIB = ("0.12.1",)
# JAX's own deadline is this much later than the watchdog's, so the watchdog always fires first.
_JAX_DEADLINE_MARGIN_S = 60


class DistributedError(RuntimeError):
  """The processes could not be connected as asked."""


def _give_up(message: str, code: int = 2) -> None:
  """A watchdog's end: the main thread is blocked inside JAX (its connect, a collective), where
  no exception reaches it, so this thread prints the one line and ends the process (exit 2, as
  cli.fail)."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access


def _seconds(env: Any, name: str, default: float, flag: str | None = None,
             value: float | None = None) -> float:
  """A positive number of seconds: `value` (from `flag`), else the variable `name`, else
  `default`."""
  where = flag or name
  if value is None:
    raw = env.get(name) or ""
    try:
      value = float(raw) if raw else default
    except ValueError:
      raise DistributedError(f"{name}: must be a number of seconds, got {raw!r}") from None
  if not value > 0:
    raise DistributedError(f"{where}: must be > 0 seconds, got {value}")
  if value == float("inf"):
    raise DistributedError(f"{where}: must be a finite number of seconds, got {value}")
  return float(value)


def _int_from(env: Any, name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise DistributedError(f"{name}: must be an integer, got {env[name]!r}") from None


def _timeout(timeout_s: float | None, env: Any) -> float:
  return _seconds(env, TIMEOUT_ENV, DEFAULT_TIMEOUT_S, "--distributed_timeout", timeout_s)


def _check_jaxlib() -> None:
  if jaxlib.__version__ in BROKEN_MULTIPROCESS_JAXLIB:
    raise DistributedError(
        f"jaxlib {jaxlib.__version__} hangs in multi-process runs (the first cross-process "
        "collective of the training run never completes; seen on CPU with gloo): install the "
        "locked versions (bash scripts/setup.sh) or another jax/jaxlib")


class _FirstStepWatchdog:
  """Ends the process with one line unless `progress()` is called within `timeout_s` of
  `start()`: a multi-process launch that connected but never completes a step (a collective
  that hangs) ends instead of waiting forever. Every process has its own, so all end."""

  def __init__(self) -> None:
    self.timer: threading.Timer | None = None

  def start(self, timeout_s: float, margin_s: float = 0.0) -> None:
    self.timer = threading.Timer(timeout_s + margin_s, _give_up, args=(
        f"no training step completed within {timeout_s:g} s after the processes connected "
        "(a collective that never completes?); every process ends. Rerun to resume, or raise "
        f"{FIRST_STEP_ENV}",))
    self.timer.daemon = True
    self.timer.start()

  def progress(self) -> None:
    if self.timer is not None:
      self.timer.cancel()
      self.timer = None


_first_step = _FirstStepWatchdog()


def made_progress() -> None:
  """The run has completed a step (or has none left to run): the first-step watchdog stops."""
  _first_step.progress()


def _sigterm_always_ends(grace_s: float) -> None:
  """However the main thread is blocked (inside a collective, where no Python signal handler
  runs), a SIGTERM ends the process within `grace_s`: the signal's byte reaches a thread through
  Python's wakeup fd; a process that handles it (the trainer saves a checkpoint and exits 143)
  is gone before the grace ends. Before the training loop's own handler is in place, SIGTERM
  ends the process at once (Python's default is restored: JAX's pre-emption service, which would
  log and ignore it, is turned off before connecting)."""
  if threading.current_thread() is not threading.main_thread():
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  try:
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  except ValueError:
    return

  def watch() -> None:
    while True:
      if signal.SIGTERM in os.read(read_fd, 64):
        time.sleep(grace_s)
        _give_up(f"SIGTERM was not acted on within {grace_s:g} s; ending this process", 143)

  threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()


def _checked_args(mode: str, address: str | None, num_processes: int | None,
                  process_id: int | None, env) -> tuple[str | None, int | None, int | None] | None:
  """(coordinator address, process count, process id) from the flags, else the environment,
  checked; None when no multi-process run is configured."""
  address = address or env.get(ENV[0]) or None
  if num_processes is None and env.get(ENV[1]):
    num_processes = _int_from(env, ENV[1])
  if process_id is None and env.get(ENV[2]):
    process_id = _int_from(env, ENV[2])
  if mode not in ("off", "auto"):
    raise DistributedError(f"--distributed: must be off or auto, got {mode!r}")
  if address is None and mode == "off":
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise DistributedError("--num_processes / --process_id need --coordinator_address")
    return None
  if address is not None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedError(f"--coordinator_address: must be host:port, got {address!r}")
    if num_processes is None or process_id is None:
      raise DistributedError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id: must be in [0, {num_processes}), got {process_id}")
  return address, num_processes, process_id


def initialize(mode: str = "off", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               environ: dict | None = None, timeout_s: float | None = None,
               training: bool = False) -> bool:
  """Joins the multi-process run if one is configured; True if this is one. Call before any
  other JAX computation (the command lines do). If the processes have not all connected within
  `timeout_s` seconds (default: FASTADV_DISTRIBUTED_TIMEOUT, else 120), prints one line naming
  the coordinator and ends the process with exit code 2 (see the module docstring). With
  `training`, a multi-process run must then complete its first step within
  FASTADV_FIRST_STEP_TIMEOUT seconds (default 900; `made_progress`), or every process ends with
  one line."""
  env = os.environ if environ is None else environ
  checked = _checked_args(mode, coordinator_address, num_processes, process_id, env)
  if checked is None:
    return False
  address, num_processes, process_id = checked
  timeout = _timeout(timeout_s, env)
  first_step = _seconds(env, FIRST_STEP_ENV, DEFAULT_FIRST_STEP_TIMEOUT_S)
  _check_jaxlib()
  # Cross-process collectives of the CPU backend (GPU/TPU backends use their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Pre-emption is preemption.py's (its module docstring says why); JAX's service would catch
  # SIGTERM and ignore it until the training loop's handler is in place.
  jax.config.update("jax_enable_preemption_service", False)
  who = (f"coordinator {address}, this is process {process_id} of {num_processes}"
         if address is not None else "coordinator detected by --distributed=auto")
  watchdog = threading.Timer(timeout, _give_up, args=(
      f"the processes of the run did not all connect within {timeout:g} s ({who}): start every "
      "process with the same --coordinator_address and --num_processes, check that process "
      "0 is running and its host:port reachable, or raise --distributed_timeout",))
  watchdog.daemon = True
  deadline = int(timeout) + _JAX_DEADLINE_MARGIN_S
  watchdog.start()
  try:
    if address is None:
      jax.distributed.initialize(initialization_timeout=deadline)
    else:
      jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                 process_id=process_id, initialization_timeout=deadline)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    raise DistributedError(f"jax.distributed.initialize failed ({who}): {first}") from e
  finally:
    watchdog.cancel()
  if jax.process_count() > 1:
    cli_logging.drop_gloo_lines()
    _sigterm_always_ends(SIGTERM_GRACE_S)
    if training:  # process 0 serves the coordinator: it ends last, after the others' lines
      _first_step.start(first_step, FIRST_STEP_COORDINATOR_MARGIN_S if is_main() else 0.0)
  return jax.process_count() > 1


def is_main() -> bool:
  """Process 0: the one that writes outputs."""
  return jax.process_index() == 0


def process_rows(n_global: int) -> slice:
  """This process's rows of a global batch of n_global rows (the devices of process p hold the
  p-th block of the pmapped axis)."""
  n_proc = jax.process_count()
  if n_global % n_proc:
    raise ValueError(f"{n_global} rows cannot be split over {n_proc} processes")
  per = n_global // n_proc
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def point_range(n: int, process: int | None = None, n_processes: int | None = None
                ) -> tuple[int, int]:
  """[start, stop) of the evaluation points a process (default: this one) evaluates:
  contiguous, sizes differing by at most one, none empty (n must be at least the process
  count)."""
  n_proc = jax.process_count() if n_processes is None else n_processes
  p = jax.process_index() if process is None else process
  if n < n_proc:
    raise ValueError(f"{n} evaluation points cannot be split over {n_proc} processes")
  return p * n // n_proc, (p + 1) * n // n_proc


def gather_points(local: Any, n: int) -> Any:
  """Per-point results of every process's `point_range(n)`, concatenated in point order (each
  leaf's leading axis); identity in a single-process run."""
  if jax.process_count() == 1:
    return local
  per = -(-n // jax.process_count())
  sizes = [b - a for a, b in (point_range(n, p) for p in range(jax.process_count()))]

  def one(v):
    v = np.asarray(v)
    padded = np.zeros((per,) + v.shape[1:], v.dtype)
    padded[:len(v)] = v
    every = np.asarray(multihost_utils.process_allgather(padded))  # (processes, per, ...)
    return np.concatenate([every[p, :size] for p, size in enumerate(sizes)])

  return jax.tree.map(one, local)


def gather_values(local: np.ndarray) -> np.ndarray:
  """One small array from every process (e.g. its wall times), stacked in process order:
  (processes, ...); (1, ...) in a single-process run."""
  if jax.process_count() == 1:
    return np.asarray(local)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(local)))


def gather_rows(local: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch -> the global batch (the inverse of process_rows)."""
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def barrier(name: str) -> None:
  """All processes wait here (e.g. until process 0 has written a checkpoint)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def from_main(value: int) -> int:
  """Process 0's `value` (an int32), on every process: how process 0's decisions reach the
  others. Every process must call it at the same point."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))


def failed_processes(failed: bool) -> list[int]:
  """The processes that report a failure (each passes its own `failed`), on every process.
  Every process must call it at the same point."""
  every = gather_values(np.asarray([failed], np.int32))
  return [p for p, f in enumerate(every.reshape(-1)) if f]
