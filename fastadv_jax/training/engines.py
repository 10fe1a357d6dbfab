"""The two ways the per-device train step runs over devices (`config.parallelism`).

Both run the same step body (train_step.make_train_step) with the same named axis
(`parallel.AXIS`), so every collective of the step, the methods and GradAlign is unchanged:

- `pmap` (the default, `PmapEngine`): `jax.pmap` over the local devices; the train state is a
  stack of per-device copies (parallel.replicate), host pytrees are checkpointed. The design
  this library was built on; on one process it is what every measurement so far used.
- `shard_map` (`ShardMapEngine`): `jax.jit(jax.shard_map(step))` on a one-axis `Mesh` over every
  device of every process. The train state is held as global `jax.Array`s: parameters,
  optimiser state, BatchNorm statistics, the weight average and run-level method state
  replicated; the per-batch carried perturbation (Free-AT) and the per-example rows sharded
  over the axis like the data. Each process feeds its rows of the global batch
  (`jax.make_array_from_process_local_data`), and Orbax checkpoints the global arrays (each
  process writes its own shards; nothing is gathered to one host). This is what JAX
  recommends for new code since pmap went into maintenance mode (JAX 0.8), and the state it
  holds is what research code built on jit and `jax.Array`s can take as it is.

The step body runs under shard_map with `check_vma=False`: with the check on, JAX would insert
the psum that the transpose of a replicated input implies into every parameter gradient, and the
step's own `pmean` of the gradients would then count it again. Off, shard_map runs the body with
pmap's per-device semantics, which is what the step was written for (the equality of both
engines is tested, method by method).

The training loop (train.py) talks to an engine only through the methods below.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.experimental import multihost_utils

from fastadv_jax import parallel

ENGINES = ("pmap", "shard_map")
StepFn = Callable[..., tuple[Any, dict]]


class PmapEngine:
  """`jax.pmap` over the local devices (the state stacked per device: parallel.replicate)."""

  name = "pmap"
  global_arrays = False  # checkpoints hold host pytrees (gathered; process 0 writes)

  def __init__(self, devices: list | None = None):
    # None: pmap's default, every device of every process (the axis spans the processes of a
    # multi-process run); a list of devices limits the axis to them (tests, benchmarks).
    self.devices = devices
    self.n_local = len(devices or parallel.local_devices())

  def compile_step(self, step_fn: StepFn) -> StepFn:
    return parallel.pmap_train_step(step_fn, devices=self.devices)

  def place_state(self, state: Any) -> Any:
    """A host train state (fresh or restored) -> the state the compiled step takes."""
    return parallel.replicate(state, self.n_local)

  def checkpoint_template(self, state: Any) -> Any:
    """What a checkpoint is restored into: the host state."""
    return state

  def restored(self, state: Any) -> Any:
    return self.place_state(state)

  def to_checkpoint(self, state: Any) -> Any:
    """The state as the checkpoint holds it: one host copy, rows gathered."""
    return parallel.unreplicate(state)

  def host_state(self, state: Any) -> Any:
    return parallel.unreplicate(state)

  def place_batch(self, batch: dict) -> dict:
    """The global host batch -> this process's rows, split over its devices."""
    return parallel.shard(parallel.process_rows(batch), self.n_local)

  def local_metrics(self, metrics: dict) -> dict:
    """Per-step metrics, leading axis over this process's devices (row 0 is what is logged)."""
    return metrics

  def first(self, tree: Any) -> Any:
    """Device 0's copy of a replicated part of the state (e.g. evaluation variables)."""
    return parallel.first_copy(tree)

  def step_of(self, state: Any) -> int:
    return int(jax.device_get(state.step)[0])


def _devices_in_process_order(devices: list | None) -> list:
  """Process p's devices form the p-th block of the axis, as pmap orders them and as each
  process's rows of the global batch (parallel.process_rows) expect."""
  devices = list(devices) if devices is not None else jax.devices()
  return sorted(devices, key=lambda d: (d.process_index, d.id))


class ShardMapEngine:
  """`jax.jit(jax.shard_map(step))` on a one-axis mesh over all devices of all processes."""

  name = "shard_map"
  global_arrays = True  # Orbax saves and restores the global arrays, shard by shard

  def __init__(self, devices: list | None = None, axis_name: str = parallel.AXIS):
    self.axis = axis_name
    self.mesh = jax.sharding.Mesh(np.array(_devices_in_process_order(devices)), (axis_name,))
    self.n_global = self.mesh.devices.size
    self.n_local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(axis_name))

  # --- layout ------------------------------------------------------------------------------
  def _specs(self, state: Any) -> Any:
    """PartitionSpecs of the train state: everything replicated but the carried perturbation
    and the per-example rows, which are split over the axis by their leading dimension."""
    spec = jax.tree.map(lambda _: P(), state)
    sharded = lambda tree: jax.tree.map(lambda _: P(self.axis), tree)  # noqa: E731
    if state.carried_delta is not None:
      spec = spec.replace(carried_delta=sharded(state.carried_delta))
    if getattr(state, "example_state", None) is not None:
      spec = spec.replace(example_state=sharded(state.example_state))
    return spec

  def _shardings(self, state: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self._specs(state),
                        is_leaf=lambda x: isinstance(x, P))

  def _padded_rows(self, n_examples: int) -> int:
    """Rows of the per-example table as the mesh holds it: padded to whole blocks per device
    (parallel.example_blocks), so device d holds rows [d R, (d + 1) R) as under pmap."""
    return parallel.example_blocks(n_examples, self.n_global) * self.n_global

  # --- the step ----------------------------------------------------------------------------
  def compile_step(self, step_fn: StepFn) -> StepFn:
    """jit(shard_map(step_fn)): the state in `_specs`, the batch split by rows, the key
    replicated; the state is donated. Metrics come out with a leading device axis (each device
    its own value, as pmap returns them). The specs depend on the state's structure, so the
    jitted function is built on the first call."""
    compiled: dict[str, Any] = {}

    def run(state, batch, rng):
      if "fn" not in compiled:
        compiled["fn"] = self.jit_step(step_fn, state)
      return compiled["fn"](state, batch, rng)

    return run

  def jit_step(self, step_fn: StepFn, state: Any) -> StepFn:
    """The jitted step for train states structured like `state` (also what the lowering
    tests export for cuda and tpu)."""
    def with_device_axis(state, batch, rng):
      new_state, metrics = step_fn(state, batch, rng)
      return new_state, jax.tree.map(lambda v: v[None], metrics)

    specs = self._specs(state)
    return jax.jit(jax.shard_map(with_device_axis, mesh=self.mesh,
                                 in_specs=(specs, P(self.axis), P()),
                                 out_specs=(specs, P(self.axis)), check_vma=False),
                   donate_argnums=(0,))

  # --- placement ---------------------------------------------------------------------------
  def _global(self, value: Any, sharding: NamedSharding) -> jax.Array:
    """A host array every process holds in full -> a global array (each process places its
    devices' shards)."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  def place_state(self, state: Any) -> Any:
    """A host train state -> global arrays laid out as `_specs` says; the per-example rows
    padded to whole blocks per device."""
    table = getattr(state, "example_state", None)
    if table is not None:
      rows = self._padded_rows(state.n_examples)
      state = state.replace(example_state=jax.tree.map(
          lambda t: np.concatenate([np.asarray(t), np.zeros(
              (rows - t.shape[0],) + t.shape[1:], t.dtype)]), table))
    return jax.tree.map(self._global, state, self._shardings(state))

  def checkpoint_template(self, state: Any) -> Any:
    """What a checkpoint is restored into: the placed state (Orbax reads each process's
    shards into it)."""
    return self.place_state(state)

  def restored(self, state: Any) -> Any:
    return state  # restored into global arrays already

  def to_checkpoint(self, state: Any) -> Any:
    return state  # the global arrays themselves

  def host_state(self, state: Any) -> Any:
    """One host copy with the per-example rows gathered (unpadded): for tests and tools."""
    table = getattr(state, "example_state", None)
    out = jax.tree.map(np.asarray, multihost_utils.process_allgather(state, tiled=True))
    if table is not None:
      out = out.replace(example_state=jax.tree.map(lambda t: t[:state.n_examples],
                                                   out.example_state))
    return out

  def place_batch(self, batch: dict) -> dict:
    """The global host batch -> one global array per entry, each process giving its rows."""
    local = parallel.process_rows(batch)
    return {k: jax.make_array_from_process_local_data(self.sharded, np.asarray(v),
                                                      np.shape(batch[k]))
            for k, v in local.items()}

  def local_metrics(self, metrics: dict) -> dict:
    """This process's first device's metrics, with a leading axis of one (as pmap's row 0)."""
    return jax.tree.map(lambda v: v.addressable_shards[0].data, metrics)

  def first(self, tree: Any) -> Any:
    """A replicated part of the state on the host (every process holds a full copy)."""
    return jax.tree.map(lambda v: np.asarray(v.addressable_shards[0].data), tree)

  def step_of(self, state: Any) -> int:
    return int(np.asarray(state.step.addressable_shards[0].data))


def create(name: str, devices: list | None = None) -> PmapEngine | ShardMapEngine:
  """The engine `config.parallelism` names (devices: pmap's local ones, shard_map's global
  ones; default all)."""
  if name == "pmap":
    return PmapEngine(devices)
  if name == "shard_map":
    return ShardMapEngine(devices)
  raise ValueError(f"parallelism: must be one of {', '.join(ENGINES)}, got {name!r}")


def state_bytes(state: Any) -> int:
  """Bytes of the arrays of a (placed) state on this process's devices: what each engine keeps
  per process (benchmarks)."""
  total = 0
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array):
      total += sum(math.prod(s.data.shape) * s.data.dtype.itemsize
                   for s in leaf.addressable_shards)
    else:
      total += np.asarray(leaf).nbytes
  return total
