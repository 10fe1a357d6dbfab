"""The train state (parameters, optimiser, BatchNorm statistics, the weight average, what a
method carries across steps) and the one function that builds it, for training and for
restoring checkpoints."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import flax.struct
from flax.training import train_state

from fastadv_jax import models
from fastadv_jax.methods.base import ModelInfo
from fastadv_jax.training import run_plan, schedules, weight_averaging


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  # The per-example perturbation a method carries from one step to the next (Free-AT), for the
  # global batch. Under pmap each device holds its slice (parallel.replicate splits it).
  carried_delta: Any = None
  # Run-level method state, replicated (ELLE-A's adaptive lambda and its error statistics).
  method_state: Any = None
  # The weight average {'params', 'batch_stats'?} (weight_averaging.py), or None when off.
  ema: Any = None
  # Per-example method state (FGSM-PGI's buffers): {name: (n_examples, row size)}, flat rows
  # indexed by training-set position; under pmap each device holds a block of rows
  # (parallel.replicate). The method sees them in its declared shapes.
  example_state: Any = None
  n_examples: int | None = flax.struct.field(pytree_node=False, default=None)  # its rows


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """SGD-momentum or Adam with L2 weight decay added to the gradient (PyTorch semantics).

  A scheduled momentum (onecycle: SGD's momentum, Adam's b1) goes through
  optax.inject_hyperparams, so only that schedule changes the opt_state layout; the trace's
  buffer update uses the current value, buf <- m_t buf + g, as PyTorch's SGD."""
  lr = schedules.lr_schedule(config, steps_per_epoch)
  momentum = schedules.momentum_schedule(config, steps_per_epoch)
  if momentum is not None:
    if config.optimizer == "sgd":
      opt = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum)
    else:
      opt = optax.inject_hyperparams(optax.adam)(learning_rate=lr, b1=momentum)
  elif config.optimizer == "sgd":
    opt = optax.sgd(lr, momentum=config.momentum)
  else:
    opt = optax.adam(lr)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), opt)


def create_train_state(config: ml_collections.ConfigDict | run_plan.RunPlan, model: nn.Module,
                       rng: jax.Array, input_shape: tuple[int, ...], steps_per_epoch: int,
                       n_examples: int | None = None) -> TrainState:
  """Float32 parameters; a carried perturbation starts at zero for the global batch, and
  per-example state at zero for each of the `n_examples` training examples."""
  dummy = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  variables = model.init(rng, dummy, train=False)
  run = run_plan.of(config)
  config, method, args = run.config, run.method, run.method_args
  carried = None
  if method.carries_delta:
    carried = jnp.zeros((config.batch_size,) + tuple(input_shape), jnp.float32)
  method_state = None
  if method.has_state:
    features, logits = jax.eval_shape(lambda v: models.penultimate_features(
        lambda z: model.apply(v, z, train=False), dummy), variables)
    method_state = method.initial_state(args, ModelInfo(
        tuple(input_shape), logits.shape[-1], features.shape[-1]))
  example_state = None
  if method.example_state is not None:
    if n_examples is None:
      raise ValueError(f"method {method.name!r} keeps per-example state: pass n_examples")
    # One flat row per example (rows of shape (28, 28, 1) made XLA:CPU copy the whole table
    # at every step to change its layout; the step reshapes the batch's rows).
    example_state = {k: np.zeros((n_examples, math.prod(v.shape)), v.dtype)
                     for k, v in method.example_state(args, tuple(input_shape)).items()}
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=make_optimizer(config, steps_per_epoch),
                           batch_stats=variables.get("batch_stats", {}), carried_delta=carried,
                           method_state=method_state,
                           ema=weight_averaging.init(config, variables),
                           example_state=example_state,
                           n_examples=None if example_state is None else n_examples)


def variables(state: TrainState) -> dict:
  """The model variables (what evaluation and early stopping use) of a host train state."""
  return {"params": state.params, "batch_stats": state.batch_stats}
