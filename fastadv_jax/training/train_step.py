"""The training step: a pure `(state, batch, rng) -> (state, metrics)`, pmapped over devices.

One step = one optimiser update:
  1. augment the batch (per-example keys, so independent of the device split);
  2. the method's training perturbation (methods/): FGSM, PGD, Free-AT's carried one, ...;
  3. loss = CE(f(x + delta), y) [+ the method's regulariser] [+ GradAlign (gradalign.py)];
  4. average parameter gradients and BatchNorm statistics over the device axis and update;
  5. the weight average (weight_averaging.py) and the method's per-example rows follow.

Label smoothing (`config.label_smoothing`, PyTorch's rule) applies to the training
cross-entropy and, with `config.label_smoothing_attack`, to the loss the training attack
ascends; evaluation attacks always use the plain cross-entropy.

BatchNorm (a choice the original leaves implicit): every forward pass of a step runs in train
mode with the batch statistics of the *global* batch (cross-device BN through `bn_axis_name`),
as the original runs every extra pass in train mode; but only the pass that the cross-entropy
is taken on (x + delta for most methods, x for GAT and NuAT) updates the running statistics.
The attack and regulariser passes would otherwise mix their statistics into the running
averages used at evaluation.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fastadv_jax import gradalign, losses, methods, models, parallel, randomness
from fastadv_jax.data import augment
from fastadv_jax.methods.base import (AttackInputs, CELossInputs, RegularizerInputs,
                                      checked_perturbation)
from fastadv_jax.training import run_plan, schedules, weight_averaging
from fastadv_jax.training.train_state import TrainState

Metrics = dict[str, jax.Array]


def _tree_l2(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _step_keys(rng: jax.Array, step: jax.Array, replay: int, n_local: int,
               axis_name: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example (augmentation, attack, noise) keys. Augmentation is keyed by the minibatch
  (Free-AT replays the same augmented batch); attack and regulariser noise by the step."""
  global_index = parallel.global_index(n_local, axis_name)
  aug_keys = randomness.example_keys(jax.random.fold_in(rng, 2 * (step // replay)), global_index)
  step_keys = randomness.example_keys(jax.random.fold_in(rng, 2 * step + 1), global_index)
  attack_keys, noise_keys = randomness.split_keys(step_keys, 2)
  return aug_keys, attack_keys, noise_keys


def _batch_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """One key per step for the whole global batch (AttackInputs.batch_key): the step's key with
  an index no example has (examples fold in their global-batch index, far below 2**31 - 1)."""
  return jax.random.fold_in(jax.random.fold_in(rng, 2 * step + 1), 2**31 - 1)


def derivative_mode(config: ml_collections.ConfigDict | run_plan.RunPlan) -> str:
  """'jvp' or 'double_backprop' for this config (run_plan.RunPlan.gradalign_derivative)."""
  return run_plan.of(config).gradalign_derivative


def gradalign_term(config: ml_collections.ConfigDict | run_plan.RunPlan, loss_fn: Callable,
                   x: jax.Array, keys: jax.Array, eps: jax.Array, clean_grad: jax.Array | None,
                   axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """(this device's share, global value) of GradAlign as the config asks (gradalign.py):
  lambda = config.grad_align_lambda, by double backpropagation or by the jvp formulation."""
  run = run_plan.of(config)
  config = run.config
  lam = float(config.grad_align_lambda)
  if run.gradalign_derivative == "jvp":
    return gradalign.regularizer_by_jvp(loss_fn, x, keys, eps, clean_grad, lam, axis_name)
  g1, g2 = gradalign.input_gradients(loss_fn, x, keys, eps, g1=clean_grad,
                                     backprop_g1=config.grad_align_backprop_g1)
  cos, mask = gradalign.masked_cosine(g1, g2)
  return gradalign.gradalign_regularizer(cos, mask, lam, axis_name)


def _updated(config: ml_collections.ConfigDict, method: methods.Method, args: Any,
             state: TrainState, grads: Any, batch_stats: Any, method_state: Any,
             pert: methods.Perturbation, g_delta: jax.Array, x: jax.Array, eps: jax.Array,
             index: jax.Array | None, axis_name: str | None) -> TrainState:
  """The state after the optimiser update with the (cross-device averaged) gradients and
  BatchNorm statistics: the method's carried perturbation (Free-AT's step reuses this backward
  pass's gradient with respect to delta), its per-example rows (at `index`, the batch's
  positions in the training set; None for a batch without, which only a method without
  per-example state may get), the weight average."""
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats,
                                    method_state=method_state)
  if method.carries_delta:
    new_state = new_state.replace(
        carried_delta=method.next_carried(args, pert.delta, g_delta, x, eps))
  if pert.example_rows is not None:
    flat = {k: v.reshape((x.shape[0], -1)) for k, v in pert.example_rows.items()}
    new_state = new_state.replace(example_state=parallel.store_example_rows(
        state.example_state, index, flat, axis_name))
  if state.ema is not None:
    new_state = new_state.replace(ema=weight_averaging.update(
        config, state.ema, new_state.params, new_state.batch_stats, state.step))
  return new_state


class StepPlan(NamedTuple):
  """What a step reads from the run's plan, resolved once when the step is built."""
  run: run_plan.RunPlan
  steps_per_epoch: int
  total_steps: int
  eps_at: Callable[[jax.Array], jax.Array]
  lr_at: Callable[[jax.Array], jax.Array]
  momentum_at: Callable[[jax.Array], jax.Array] | None  # None unless scheduled
  replay: int                                # consecutive steps on one minibatch (Free-AT)
  use_gradalign: bool
  smoothing: float                           # the training cross-entropy's label smoothing
  attack_smoothing: float                    # the training attack's

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | run_plan.RunPlan,
                  steps_per_epoch: int) -> "StepPlan":
    run = run_plan.of(config)
    config, method, args = run.config, run.method, run.method_args
    smoothing = float(config.label_smoothing)
    return cls(run=run, steps_per_epoch=steps_per_epoch,
               total_steps=schedules.total_steps(config, steps_per_epoch),
               eps_at=schedules.eps_schedule(config, steps_per_epoch),
               lr_at=schedules.lr_schedule(config, steps_per_epoch),
               momentum_at=schedules.momentum_schedule(config, steps_per_epoch),
               replay=method.replays(args), use_gradalign=float(config.grad_align_lambda) > 0,
               smoothing=smoothing,
               attack_smoothing=smoothing if config.label_smoothing_attack else 0.0)

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.run.config

  @property
  def method(self) -> methods.Method:
    return self.run.method

  @property
  def args(self) -> Any:
    """The method's hyperparameter record."""
    return self.run.method_args

  def train_ce(self, logits: jax.Array, y: jax.Array, keys: jax.Array) -> jax.Array:
    """The per-example training cross-entropy: the method's own, else CE with smoothing."""
    if self.method.train_ce is not None:
      return self.method.train_ce(CELossInputs(args=self.args, logits=logits, y=y, keys=keys,
                                               label_smoothing=self.smoothing))
    return losses.cross_entropy(logits, y, self.smoothing)


class StepInputs(NamedTuple):
  """One step's augmented batch, keys and schedule values."""
  x: jax.Array
  y: jax.Array
  attack_keys: jax.Array
  noise_keys: jax.Array
  eps: jax.Array
  progress: jax.Array                        # fraction of training done after this step
  epoch: jax.Array


class ModelFns(NamedTuple):
  """The model at the step's weights and BatchNorm statistics, as the passes use it."""
  forward: Callable      # (params, x) -> (logits, new batch statistics), train mode
  eval_logits: Callable  # x -> logits, eval mode (running statistics, not updated)
  features: Callable     # x -> (penultimate features, logits), train mode
  per_example_loss: Callable  # (params, smoothing) -> (x -> per-example CE against y)


def _step_inputs(plan: StepPlan, state: TrainState, batch: dict[str, jax.Array],
                 rng: jax.Array, axis_name: str | None) -> StepInputs:
  aug_keys, attack_keys, noise_keys = _step_keys(rng, state.step, plan.replay,
                                                 batch["label"].shape[0], axis_name)
  x = augment.augment(aug_keys, augment.to_float(batch["image"]), plan.config.crop_padding,
                      plan.config.flip)
  return StepInputs(x=x, y=batch["label"], attack_keys=attack_keys, noise_keys=noise_keys,
                    eps=plan.eps_at(state.step),
                    progress=(state.step + 1) / plan.total_steps,
                    epoch=state.step // plan.steps_per_epoch)


def _model_fns(state: TrainState, y: jax.Array) -> ModelFns:
  def forward(params, inputs):
    logits, new_vars = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                      inputs, train=True, mutable=["batch_stats"])
    return logits, new_vars["batch_stats"]

  def eval_logits(inputs):
    return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats}, inputs,
                          train=False)

  def features(inputs):
    return models.penultimate_features(lambda z: forward(state.params, z)[0], inputs)

  def per_example_loss(params, smoothing_=0.0):
    return lambda inputs: losses.cross_entropy(forward(params, inputs)[0], y, smoothing_)

  return ModelFns(forward, eval_logits, features, per_example_loss)


def _perturbation(plan: StepPlan, state: TrainState, batch: dict[str, jax.Array],
                  inp: StepInputs, fns: ModelFns, rng: jax.Array, axis_name: str | None
                  ) -> methods.Perturbation:
  """The method's inner maximisation at the current weights (its statistics updates are
  discarded), with the batch's rows of the per-example state."""
  method, args, x = plan.method, plan.args, inp.x
  rows = None
  if method.example_state is not None:
    row_shapes = {k: v.shape for k, v in method.example_state(args, x.shape[1:]).items()}
    flat = parallel.example_rows(state.example_state, batch["index"], axis_name)
    rows = {k: v.reshape((x.shape[0],) + row_shapes[k]) for k, v in flat.items()}
  pert = method.perturb(AttackInputs(
      args=args, loss_fn=fns.per_example_loss(state.params, plan.attack_smoothing),
      logits_fn=lambda z: fns.forward(state.params, z)[0], x=x, y=inp.y,
      keys=inp.attack_keys, eps=inp.eps, carried=state.carried_delta,
      init=method.init_kind(plan.config), step=state.step, progress=inp.progress,
      axis_name=axis_name, state=state.method_state, example_rows=rows, epoch=inp.epoch,
      eval_logits_fn=fns.eval_logits, features_fn=fns.features,
      label_smoothing=plan.smoothing, batch_key=_batch_key(rng, state.step)))
  return checked_perturbation(method, pert, x)


def _loss_fn(plan: StepPlan, inp: StepInputs, fns: ModelFns, pert: methods.Perturbation,
             attack_state: Any, axis_name: str | None) -> Callable:
  """(params, delta) -> (loss, aux): the cross-entropy at the method's training point, its
  regulariser, and GradAlign on top; differentiated with respect to both."""
  method, x, y = plan.method, inp.x, inp.y

  def loss_fn(params, delta):
    reg_inputs = RegularizerInputs(
        args=plan.args, forward=fns.forward, params=params, x=x, y=y, delta=delta, logits=None,
        keys=inp.noise_keys, eps=inp.eps, state=attack_state, progress=inp.progress,
        axis_name=axis_name, aux=pert.aux, ce_aux=None, epoch=inp.epoch)
    ce_aux = None
    if callable(method.ce_at):
      inputs, ce_aux = method.ce_at(reg_inputs)
    else:
      inputs = x + delta if method.ce_at == "adversarial" else x
    logits, new_stats = fns.forward(params, inputs)
    ce = jnp.mean(plan.train_ce(logits, y, inp.noise_keys))
    total, method_reg, method_state = ce, jnp.zeros(()), attack_state
    if method.regularizer is not None:
      out = method.regularizer(reg_inputs._replace(logits=logits, ce_aux=ce_aux))
      total, method_reg, method_state = total + out.local, out.value, out.state
    local_reg, reg = jnp.zeros(()), jnp.zeros(())
    if plan.use_gradalign:
      local_reg, reg = gradalign_term(plan.run, fns.per_example_loss(params), x,
                                      inp.noise_keys, inp.eps, pert.clean_grad, axis_name)
    return total + local_reg, (ce, reg, method_reg, logits, new_stats, method_state)

  return loss_fn


def _metrics(plan: StepPlan, state: TrainState, new_state: TrainState,
             batch: dict[str, jax.Array], inp: StepInputs, ce: jax.Array, reg: jax.Array,
             method_reg: jax.Array, logits: jax.Array, grads: Any, axis_name: str | None
             ) -> Metrics:
  """What the step logs, averaged over the devices."""
  ce_g = parallel.pmean(ce, axis_name)
  acc = parallel.pmean(losses.accuracy(logits, inp.y), axis_name)
  loss = ce_g + reg
  if plan.method.regularizer is not None:
    loss = loss + method_reg
  grad_norm = _tree_l2(grads)
  metrics = {
      "train_loss": loss, "train_ce": ce_g, "train_reg": reg, "train_acc": acc,
      "l2_grads": grad_norm, "l2_params": _tree_l2(new_state.params),
      "lr": plan.lr_at(state.step), "eps": inp.eps,
      "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
  }
  if plan.method.regularizer is not None:
    metrics["train_method_reg"] = method_reg
  if plan.momentum_at is not None:
    metrics["momentum"] = plan.momentum_at(state.step)
  if state.ema is not None:
    metrics["l2_params_avg"] = _tree_l2(new_state.ema["params"])
  if "stop" in batch:  # several processes: every process's stop flag, agreed (preemption.py)
    metrics["stop"] = parallel.pmax(jnp.max(batch["stop"]), axis_name)
  return metrics


def make_train_step(config: ml_collections.ConfigDict | run_plan.RunPlan, model: nn.Module,
                    steps_per_epoch: int,
                    axis_name: str | None = parallel.AXIS
                    ) -> Callable[..., tuple[TrainState, Metrics]]:
  """Returns the per-device step; `axis_name` must be bound (pmap) unless None."""
  del model  # the step applies state.apply_fn; kept in the signature for symmetry with create
  plan = StepPlan.from_config(config, steps_per_epoch)

  def step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array
           ) -> tuple[TrainState, Metrics]:
    # 1. The batch and its keys.
    inp = _step_inputs(plan, state, batch, rng, axis_name)
    fns = _model_fns(state, inp.y)
    # 2. Inner maximisation with the current weights.
    pert = _perturbation(plan, state, batch, inp, fns, rng, axis_name)
    attack_state = state.method_state if pert.state is None else pert.state
    # 3. The training loss: cross-entropy, the method's regulariser, GradAlign on top.
    loss_fn = _loss_fn(plan, inp, fns, pert, attack_state, axis_name)
    (_, (ce, reg, method_reg, logits, new_stats, method_state)), (grads, g_delta) = (
        jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(state.params, pert.delta))
    # 4. Cross-device averaging, then the update.
    grads = parallel.pmean(grads, axis_name)
    new_state = _updated(plan.config, plan.method, plan.args, state, grads,
                         parallel.pmean(new_stats, axis_name), method_state, pert, g_delta,
                         inp.x, inp.eps, batch.get("index"), axis_name)
    # 5. What is logged.
    return new_state, _metrics(plan, state, new_state, batch, inp, ce, reg, method_reg, logits,
                               grads, axis_name)

  return step
