"""Device placement, in one place: the device axis, how arrays are laid over devices, and back.

The design is data parallelism over a named axis `AXIS`: a per-device function sees its slice of
the global batch, and collectives over the axis (gradient and BatchNorm-statistic means,
GradAlign's masked counts) make it compute what one device would on the whole batch. The same
per-device function runs under `jax.pmap` or under `jax.jit(jax.shard_map(...))`
(engines.py, `config.parallelism`); the functions below that run inside the step work under
both. The host-side layout functions are pmap's (stacked per-device copies):
  - `shard(tree, n)`:       host batch (global, leading axis) -> (n, global/n, ...) for pmap;
  - `unshard(tree, m)`:     the reverse, keeping the first m rows (drops evaluation padding);
  - `replicate(state, n)` / `unreplicate(state)`: the train state, with its per-batch carried
    part (`TrainState.carried_delta`) split over devices like data, and its per-example state
    (`TrainState.example_state`, one row per training example) split into blocks of rows, not
    copied;
  - `example_rows` / `store_example_rows`: inside the step, the rows of the batch's examples
    and their update, wherever on the devices those rows live;
  - `global_index(n_local)`: inside the step, each local example's index in the global batch
    (what per-example randomness is keyed on, so results do not depend on the device count).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax.runtime import distributed

# The name of the pmapped device axis: collectives and shardings refer to it.
AXIS = "batch"


def local_devices(n: int | None = None) -> list:
  """The first n local devices (all when n is None)."""
  devices = jax.local_devices()
  return devices if n is None else devices[:n]


def pmap_sharding(n_devices: int, axis_name: str = AXIS) -> jax.sharding.NamedSharding:
  """The sharding pmap gives its outputs: leading axis split over the first n local devices.

  A train state placed this way matches the pmapped step's own outputs, so the step's second
  call hits the compilation cache; a host-placed state made JAX trace and compile it a second
  time (0.69 s for the paper CNN's FGSM step at batch 128; BENCHMARKS.md).
  """
  mesh = jax.sharding.Mesh(np.array(local_devices(n_devices)), (axis_name,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))


def process_rows(tree: Any) -> Any:
  """This process's rows of a global host batch (all rows in a single-process run)."""
  leaves = jax.tree.leaves(tree)
  rows = distributed.process_rows(leaves[0].shape[0])
  return jax.tree.map(lambda v: v[rows], tree)


def shard(tree: Any, n_devices: int) -> Any:
  """Splits the leading (global batch) axis of every leaf into (n_devices, per-device, ...)."""
  return jax.tree.map(lambda v: v.reshape((n_devices, -1) + v.shape[1:]), tree)


def unshard(tree: Any, m: int | None = None) -> Any:
  """(n_devices, per-device, ...) -> host (global, ...), keeping the first m rows."""
  return jax.tree.map(lambda v: np.asarray(v).reshape((-1,) + v.shape[2:])[:m], tree)


def example_blocks(n_examples: int, n_global_devices: int) -> int:
  """Rows per device of per-example state: n_examples padded to a multiple of the devices."""
  return -(-n_examples // n_global_devices)


def _split_example_state(table: Any, n_devices: int) -> Any:
  """Host rows (n_examples, ...) -> this process's blocks (n_devices, rows per device, ...):
  device d of the global axis holds rows [d R, (d + 1) R), the tail padded with zeros."""
  def split(v):
    v = np.asarray(v)
    n_global = n_devices * jax.process_count()
    rows = example_blocks(v.shape[0], n_global)
    padded = np.zeros((rows * n_global,) + v.shape[1:], v.dtype)
    padded[:v.shape[0]] = v
    return shard(process_rows(padded), n_devices)
  return jax.tree.map(split, table)


def _join_example_state(blocks: Any, n_examples: int) -> Any:
  """The inverse of `_split_example_state`: every process's blocks -> host rows."""
  return jax.tree.map(
      lambda v: distributed.gather_rows(unshard(jax.device_get(v)))[:n_examples], blocks)


def replicate(state: Any, n_devices: int, axis_name: str = AXIS) -> Any:
  """Host train state -> stacked per-device copies (leading axis n_devices), placed as pmap
  places its outputs (`axis_name` must be the pmapped step's). The per-batch carried
  perturbation is split over devices like the batch, and the per-example state into blocks of
  rows (`_split_example_state`), instead of being copied."""
  carried, table = state.carried_delta, getattr(state, "example_state", None)
  rest = state.replace(carried_delta=None)
  if table is not None:
    rest = rest.replace(example_state=None)
  rest = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n_devices,) + np.shape(x)), rest)
  if carried is not None:
    carried = shard(process_rows(np.asarray(carried)), n_devices)
  state = rest.replace(carried_delta=carried)
  if table is not None:
    state = state.replace(example_state=_split_example_state(table, n_devices))
  if jax.process_count() > 1:
    return state  # pmap places host arrays over the devices of all processes itself
  return jax.device_put(state, pmap_sharding(n_devices, axis_name))


def unreplicate(state: Any) -> Any:
  """Per-device copies -> one host copy; the carried perturbation is gathered into the global
  batch and the per-example state into its n_examples rows."""
  carried, table = state.carried_delta, getattr(state, "example_state", None)
  rest = state.replace(carried_delta=None)
  if table is not None:
    rest = rest.replace(example_state=None)
  rest = jax.device_get(jax.tree.map(lambda x: x[0], rest))
  if carried is not None:
    carried = distributed.gather_rows(unshard(jax.device_get(carried)))
  rest = rest.replace(carried_delta=carried)
  if table is not None:
    rest = rest.replace(example_state=_join_example_state(table, state.n_examples))
  return rest


def first_copy(tree: Any) -> Any:
  """Device 0's copy of a replicated pytree (e.g. evaluation variables from the train state)."""
  return jax.tree.map(lambda x: x[0], tree)


def global_index(n_local: int, axis_name: str | None = AXIS) -> jax.Array:
  """Inside a pmapped function: the global-batch index of each of this device's examples."""
  dev = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  return dev * n_local + jnp.arange(n_local)


def example_rows(table: Any, index: jax.Array, axis_name: str | None = AXIS) -> Any:
  """Inside the step: the per-example state rows of this device's examples (`index`: their
  training-set positions). Each row lives on one device; the owners contribute their rows and
  zeros elsewhere, and a sum-scatter over the axis hands every device its examples' rows (exact:
  one value plus zeros). Without an axis, a plain gather."""
  if axis_name is None:
    return jax.tree.map(lambda t: t[index], table)
  all_index = jax.lax.all_gather(index, axis_name, tiled=True)

  def rows(t):
    local, mine = _owned(all_index, t.shape[0], axis_name)
    picked = t[jnp.where(mine, local, 0)]
    picked = jnp.where(mine.reshape((-1,) + (1,) * (t.ndim - 1)), picked, jnp.zeros_like(picked))
    return jax.lax.psum_scatter(picked, axis_name, tiled=True)

  return jax.tree.map(rows, table)


def store_example_rows(table: Any, index: jax.Array, new_rows: Any,
                       axis_name: str | None = AXIS) -> Any:
  """The inverse of `example_rows`: writes this device's examples' new rows; every device
  receives the global batch's rows and keeps those it owns."""
  if axis_name is None:
    return jax.tree.map(lambda t, r: t.at[index].set(r.astype(t.dtype)), table, new_rows)
  all_index = jax.lax.all_gather(index, axis_name, tiled=True)

  def store(t, r):
    local, mine = _owned(all_index, t.shape[0], axis_name)
    r = jax.lax.all_gather(r.astype(t.dtype), axis_name, tiled=True)
    return t.at[jnp.where(mine, local, t.shape[0])].set(r, mode="drop")

  return jax.tree.map(store, table, new_rows)


def _owned(all_index: jax.Array, rows_per_device: int, axis_name: str
           ) -> tuple[jax.Array, jax.Array]:
  """(position in this device's block, whether this device owns the row) of global indices."""
  local = all_index - jax.lax.axis_index(axis_name) * rows_per_device
  return local, (local >= 0) & (local < rows_per_device)


def pmean(x: Any, axis_name: str | None = AXIS) -> Any:
  """Mean over the device axis (identity when the function is not mapped)."""
  return x if axis_name is None else jax.lax.pmean(x, axis_name)


def pmax(x: Any, axis_name: str | None = AXIS) -> Any:
  """Maximum over the device axis (identity when the function is not mapped)."""
  return x if axis_name is None else jax.lax.pmax(x, axis_name)


def global_mean(per_example: jax.Array, axis_name: str | None = AXIS
                ) -> tuple[jax.Array, jax.Array]:
  """Mean over the global batch of a per-example term, as (local share, global value).

  The local share is scaled so that the pmean of the devices' parameter gradients is exactly
  the gradient of the global mean; the value (no gradient) is what to log.
  """
  local_sum = jnp.sum(per_example)
  if axis_name is None:
    return local_sum / per_example.shape[0], local_sum / per_example.shape[0]
  n_dev = device_count(axis_name)
  count = per_example.shape[0] * n_dev
  value = jax.lax.psum(jax.lax.stop_gradient(local_sum), axis_name) / count
  return n_dev * local_sum / count, value


def gather_batch(x: jax.Array, axis_name: str | None = AXIS) -> jax.Array:
  """This device's slice -> the global batch (for terms that couple examples, e.g. NuAT's
  nuclear norm). Its gradient flows back to each slice, summed over devices."""
  return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def device_count(axis_name: str | None = AXIS):
  return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def pmap_train_step(step_fn: Callable, devices: list | None = None) -> Callable:
  """pmap over local devices: state and batch sharded on axis 0, rng shared; state donated."""
  return jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None), devices=devices,
                  donate_argnums=(0,))


def device_batch_size(batch_size: int, n_devices: int) -> int:
  """The largest multiple of the device count not above `batch_size` (at least one per device):
  the chunk size evaluations ask `chunks_for_devices` for."""
  return max(n_devices, batch_size - batch_size % n_devices)


def chunks_for_devices(n: int, chunk: int, n_devices: int, *, balanced: bool = False
                       ) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (m, idx) over n points: idx, positions in 0..n-1, padded by wrapping around to a
  multiple of the device count; its first m entries are real (the one chunking rule of the
  Evaluator and AutoAttack's runner).

  balanced=False: chunks of `chunk` points (a multiple of the device count), the last one
  padded only to a multiple of the device count. balanced=True, for AutoAttack, whose attacks
  run on a shrinking set of points: the n points are spread evenly over ceil(n / chunk) chunks
  whose per-device size is rounded up to the form k * 2^j (k = 4..7, wasting under 25 %), every
  chunk padded to that size, so the number of compiled programs stays small.
  """
  if balanced:
    n_chunks = -(-n // chunk)
    per_dev = -(-n // (n_chunks * n_devices))
    if per_dev > 8:
      grain = 2 ** (per_dev.bit_length() - 3)
      per_dev = -(-per_dev // grain) * grain
    chunk = per_dev * n_devices
  for start in range(0, n, chunk):
    m = min(start + chunk, n) - start
    padded = chunk if balanced else m + (-m) % n_devices
    yield m, np.arange(start, start + padded) % n
