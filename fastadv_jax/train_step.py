"""The training step: a pure `(state, batch, rng) -> (state, metrics)`, pmapped over devices.

One step = one optimiser update:
  1. augment the batch (per-example keys, so independent of the device split);
  2. find the training perturbation (perturbations.py; Free-AT's is folded into step 4);
  3. loss = CE(f(x + delta), y) + GradAlign term (gradalign.py), if lambda > 0;
  4. average parameter gradients and BatchNorm statistics over the device axis and update.

BatchNorm (a choice the original leaves implicit): every forward pass of a step runs in train
mode with the batch statistics of the *global* batch (cross-device BN through `bn_axis_name`),
as the original runs every extra pass in train mode; but only the pass that the weights are
trained on, at x + delta, updates the running statistics. The attack and GradAlign passes would
otherwise mix clean/noisy-input statistics into the running averages used at evaluation.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from fastadv_jax import attacks, data, gradalign, losses, perturbations, randomness, schedules
from fastadv_jax.train_state import AXIS, TrainState
Metrics = dict[str, jax.Array]


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
  """Float32 parameters; Free-AT's carried perturbation starts at zero for the global batch."""
  variables = model.init(rng, jnp.zeros((1,) + tuple(input_shape), jnp.float32), train=False)
  free_delta = None
  if config.method == "free":
    free_delta = jnp.zeros((config.batch_size,) + tuple(input_shape), jnp.float32)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=make_optimizer(config, steps_per_epoch),
                           batch_stats=variables.get("batch_stats", {}), free_delta=free_delta)


def _tree_l2(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module, steps_per_epoch: int,
                    axis_name: str | None = AXIS) -> Callable[..., tuple[TrainState, Metrics]]:
  """Returns the per-device step; `axis_name` must be bound (pmap) unless None."""
  eps_at = schedules.eps_schedule(config, steps_per_epoch)
  lr_at = schedules.lr_schedule(config, steps_per_epoch)
  lam = float(config.grad_align_lambda)
  replay = config.free_replay if config.method == "free" else 1

  def pmean(x):
    return x if axis_name is None else jax.lax.pmean(x, axis_name)

  def step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
           ) -> tuple[TrainState, Metrics]:
    n_local = batch["label"].shape[0]
    dev = 0 if axis_name is None else jax.lax.axis_index(axis_name)
    global_index = dev * n_local + jnp.arange(n_local)
    # Augmentation is keyed by the minibatch (Free-AT replays the same augmented batch);
    # attack and GradAlign noise by the step.
    aug_keys = randomness.example_keys(jax.random.fold_in(rng, 2 * (state.step // replay)),
                                       global_index)
    step_keys = randomness.example_keys(jax.random.fold_in(rng, 2 * state.step + 1), global_index)
    attack_keys, noise_keys = randomness.split_keys(step_keys, 2)
    x = data.augment(aug_keys, data.to_float(batch["image"]), config.crop_padding, config.flip)
    y = batch["label"]
    eps = eps_at(state.step)

    def forward(params, inputs):
      logits, new_vars = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                        inputs, train=True, mutable=["batch_stats"])
      return logits, new_vars["batch_stats"]

    def per_example_loss(params):
      return lambda inputs: losses.cross_entropy(forward(params, inputs)[0], y)

    # 2. Inner maximisation with the current weights (its statistics updates are discarded).
    g_clean = None
    if config.method == "free":
      delta = attacks.project(state.free_delta, x, eps)
    else:
      delta, g_clean = perturbations.training_perturbation(
          config, per_example_loss(state.params), x, attack_keys, eps)

    # 3. The training loss, with GradAlign on top of any method.
    def loss_fn(params, delta):
      logits, new_stats = forward(params, x + delta)
      ce = jnp.mean(losses.cross_entropy(logits, y))
      local_reg, reg = jnp.zeros(()), jnp.zeros(())
      if lam > 0:
        g1, g2 = gradalign.input_gradients(per_example_loss(params), x, noise_keys, eps,
                                           g1=g_clean, backprop_g1=config.grad_align_backprop_g1)
        cos, mask = gradalign.masked_cosine(g1, g2)
        local_reg, reg = gradalign.gradalign_regularizer(cos, mask, lam, axis_name)
      return ce + local_reg, (ce, reg, logits, new_stats)

    (_, (ce, reg, logits, new_stats)), (grads, g_delta) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, delta)

    # 4. Cross-device averaging, then the update.
    grads = pmean(grads)
    new_stats = pmean(new_stats)
    new_state = state.apply_gradients(grads=grads, batch_stats=new_stats)
    if config.method == "free":  # the "free" perturbation step reuses this backward pass
      new_delta = attacks.project(delta + config.free_alpha * eps * jnp.sign(g_delta), x, eps)
      new_state = new_state.replace(free_delta=jax.lax.stop_gradient(new_delta))

    ce_g, reg_g, acc = pmean(ce), reg, pmean(losses.accuracy(logits, y))
    loss = ce_g + reg_g
    grad_norm = _tree_l2(grads)
    metrics = {
        "train_loss": loss, "train_ce": ce_g, "train_reg": reg_g, "train_acc": acc,
        "l2_grads": grad_norm, "l2_params": _tree_l2(new_state.params),
        "lr": lr_at(state.step), "eps": eps,
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    }
    return new_state, metrics

  return step


def pmap_train_step(step_fn: Callable, devices: list | None = None) -> Callable:
  """pmap over local devices: state and batch sharded on axis 0, rng shared; state donated."""
  return jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None), devices=devices,
                  donate_argnums=(0,))
