"""TrainState carrying BatchNorm statistics (and Free-AT's carried perturbation)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np
from flax.training import train_state


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # Free-AT: the perturbation carried from one minibatch to the next. Under pmap each device
  # holds its own slice, so (un)replicate treat it as data, not as a replicated value.
  free_delta: Any = None


# The name of the pmapped device axis (train_step.AXIS): collectives and shardings refer to it.
AXIS = "batch"


def pmap_sharding(n_devices: int, axis_name: str = AXIS) -> jax.sharding.NamedSharding:
  """The sharding pmap gives its outputs: leading axis split over the first n local devices.

  A train state placed this way matches the pmapped step's own outputs, so the step's second
  call hits the compilation cache; a host-placed state made JAX trace and compile it a second
  time (0.69 s for the paper CNN's FGSM step at batch 128; BENCHMARKS.md).
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:n_devices]), (axis_name,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))


def replicate(state: TrainState, n_devices: int, axis_name: str = AXIS) -> TrainState:
  """Host state -> stacked per-device copies (leading axis n_devices), placed as pmap places
  its outputs (`axis_name` must be the pmapped step's)."""
  free = state.free_delta
  rest = state.replace(free_delta=None)
  rest = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n_devices,) + np.shape(x)), rest)
  if free is not None:
    free = np.reshape(np.asarray(free), (n_devices, -1) + free.shape[1:])
  return jax.device_put(rest.replace(free_delta=free), pmap_sharding(n_devices, axis_name))


def unreplicate(state: TrainState) -> TrainState:
  """Per-device copies -> one host copy; Free-AT's delta is gathered into the global batch."""
  free = state.free_delta
  rest = jax.device_get(jax.tree.map(lambda x: x[0], state.replace(free_delta=None)))
  if free is not None:
    free = np.asarray(jax.device_get(free))
    free = free.reshape((-1,) + free.shape[2:])
  return rest.replace(free_delta=free)
