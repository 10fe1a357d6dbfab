"""TrainState carrying BatchNorm statistics (and Free-AT's carried perturbation)."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax.training import train_state


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # Free-AT: the perturbation carried from one minibatch to the next. Under pmap each device
  # holds its own slice, so (un)replicate treat it as data, not as a replicated value.
  free_delta: Any = None


def replicate(state: TrainState, n_devices: int) -> TrainState:
  """Host state -> stacked per-device copies (leading axis n_devices) for pmap."""
  free = state.free_delta
  rest = state.replace(free_delta=None)
  rest = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_devices,) + jnp.shape(x)), rest)
  if free is not None:
    free = jnp.reshape(free, (n_devices, -1) + free.shape[1:])
  return rest.replace(free_delta=free)


def unreplicate(state: TrainState) -> TrainState:
  """Per-device copies -> one host copy; Free-AT's delta is gathered into the global batch."""
  free = state.free_delta
  rest = jax.device_get(jax.tree.map(lambda x: x[0], state.replace(free_delta=None)))
  if free is not None:
    free = np.asarray(jax.device_get(free))
    free = free.reshape((-1,) + free.shape[2:])
  return rest.replace(free_delta=free)
