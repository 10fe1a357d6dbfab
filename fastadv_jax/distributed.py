"""Several processes (hosts) as one run, on JAX's own distributed runtime (`jax.distributed`).

Every process runs the same command; `initialize` connects them. After that the pmapped step
spans the devices of all processes (the named axis covers them all, so gradient and BatchNorm
means are global), each process feeds only its rows of every global batch (`process_rows`),
evaluation splits its points over the processes (`gather_points`), and only process 0 writes
metrics, TensorBoard, checkpoints, config.json and results.json or shows a progress bar
(`is_main`). Nothing here changes a single-process run.

How a run is joined, first match wins:
  1. explicit: coordinator address, process count and id (flags of `main`, or the environment
     variables FASTADV_COORDINATOR_ADDRESS, FASTADV_NUM_PROCESSES, FASTADV_PROCESS_ID);
  2. `auto`: `jax.distributed.initialize()` with no arguments, which detects Cloud TPU pods,
     SLURM and Open MPI (`--distributed=auto`).
On CPU the cross-process collectives use gloo.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

ENV = ("FASTADV_COORDINATOR_ADDRESS", "FASTADV_NUM_PROCESSES", "FASTADV_PROCESS_ID")


class DistributedError(RuntimeError):
  """The processes could not be connected as asked."""


def initialize(mode: str = "off", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               environ: dict | None = None) -> bool:
  """Joins the multi-process run if one is configured; True if this is one. Call before any
  other JAX computation (the command lines do)."""
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get(ENV[0]) or None
  if num_processes is None and env.get(ENV[1]):
    num_processes = int(env[ENV[1]])
  if process_id is None and env.get(ENV[2]):
    process_id = int(env[ENV[2]])
  if mode not in ("off", "auto"):
    raise DistributedError(f"--distributed: must be off or auto, got {mode!r}")
  if address is None and mode == "off":
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise DistributedError("--num_processes / --process_id need --coordinator_address")
    return False
  if address is not None:
    if num_processes is None or process_id is None:
      raise DistributedError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise DistributedError(f"--process_id: must be in [0, {num_processes}), got {process_id}")
  # Cross-process collectives of the CPU backend (GPU/TPU backends use their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if address is None:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                                 process_id=process_id)
  except Exception as e:  # pylint: disable=broad-except
    raise DistributedError(f"jax.distributed.initialize failed: {e}") from e
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
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  per = -(-n // jax.process_count())
  sizes = [b - a for a, b in (point_range(n, p) for p in range(jax.process_count()))]

  def one(v):
    v = np.asarray(v)
    padded = np.zeros((per,) + v.shape[1:], v.dtype)
    padded[:len(v)] = v
    every = np.asarray(multihost_utils.process_allgather(padded))  # (processes, per, ...)
    return np.concatenate([every[p, :size] for p, size in enumerate(sizes)])

  return jax.tree.map(one, local)


def gather_rows(local: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch -> the global batch (the inverse of process_rows)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def barrier(name: str) -> None:
  """All processes wait here (e.g. until process 0 has written a checkpoint)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
