"""The train state (parameters, optimiser, BatchNorm statistics, what a method carries across
steps) and the one function that builds it, for training and for restoring checkpoints."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from fastadv_jax import methods, schedules


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # The per-example perturbation a method carries from one step to the next (Free-AT), for the
  # global batch. Under pmap each device holds its slice (parallel.replicate splits it).
  carried_delta: Any = None
  # Run-level method state, replicated (ELLE-A's adaptive lambda and its error statistics).
  method_state: Any = None


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """SGD-momentum or Adam with L2 weight decay added to the gradient (PyTorch semantics)."""
  lr = schedules.lr_schedule(config, steps_per_epoch)
  if config.optimizer == "sgd":
    opt = optax.sgd(lr, momentum=config.momentum)
  else:
    opt = optax.adam(lr)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), opt)


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module, rng: jax.Array,
                       input_shape: tuple[int, ...], steps_per_epoch: int) -> TrainState:
  """Float32 parameters; a carried perturbation starts at zero for the global batch."""
  variables = model.init(rng, jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)
  method = methods.get(config.method)
  carried = None
  if method.carries_delta:
    carried = jnp.zeros((config.batch_size,) + tuple(input_shape), jnp.float32)
  method_state = method.init_state(method.args_from(config)) if method.init_state else None
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=make_optimizer(config, steps_per_epoch),
                           batch_stats=variables.get("batch_stats", {}), carried_delta=carried,
                           method_state=method_state)


def variables(state: TrainState) -> dict:
  """The model variables (what evaluation and early stopping use) of a host train state."""
  return {"params": state.params, "batch_stats": state.batch_stats}
