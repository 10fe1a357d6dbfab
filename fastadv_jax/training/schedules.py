"""Everything indexed by training time, converted from epochs to iterations in one place.

An *iteration* is one optimiser update. For Free-AT each minibatch is replayed m times, so one
epoch of iterations is `steps_per_epoch` updates covering 1/m of the data (the paper's Free-AT
"96 epochs" are 96 epochs of updates, i.e. 12 passes over the data with m = 8).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import optax


# PyTorch's torch.optim.lr_scheduler.OneCycleLR defaults (three_phase False, anneal 'cos',
# cycle_momentum True), which the 2024-26 fast-AT benchmark uses with max_lr = lr_max.
ONECYCLE_PCT_START = 0.3
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4
ONECYCLE_BASE_MOMENTUM = 0.85
ONECYCLE_MAX_MOMENTUM = 0.95


def _by_epoch(config: ml_collections.ConfigDict) -> bool:
  return config.schedule_unit == "epoch"


def _onecycle(s, total: int, start: float, peak: float, end: float):
  """OneCycleLR's two cosine phases at scheduler step s (0-based) of `total`: start -> peak
  until step pct_start * total - 1, then peak -> end at step total - 1 (PyTorch's phase ends)."""
  mid = float(ONECYCLE_PCT_START * total) - 1.0
  last = float(total - 1)
  s = jnp.clip(jnp.asarray(s, jnp.float32), 0.0, last)  # PyTorch refuses steps past the end

  def anneal(a: float, b: float, left):
    # PyTorch's b + (a - b) (cos(pi pct) + 1) / 2, written with the fraction left = 1 - pct as
    # sin^2(pi left / 2): the same value, without float32 cancellation as pct -> 1.
    return b + (a - b) * jnp.sin(jnp.pi / 2.0 * left) ** 2

  up = anneal(start, peak, (mid - s) / (mid if mid > 0 else 1.0))
  down = anneal(peak, end, (last - s) / (last - mid))
  return jnp.where(s <= mid, up, down)


def _onecycle_step(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """(iteration -> OneCycleLR step, total_steps). Per epoch: PyTorch's scheduler.step() after
  each epoch, so epoch e trains with the value at step e, over total_steps = num_epochs."""
  if _by_epoch(config):
    return (lambda step: step // steps_per_epoch), int(math.ceil(config.num_epochs))
  return (lambda step: step), total_steps(config, steps_per_epoch)


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Per-iteration learning rate as the original: t = (step + 1) / steps_per_epoch in epochs.

  With config.schedule_unit == "epoch" the value is held for each epoch, PyTorch-style (a
  scheduler stepped after every epoch): epoch e trains with the schedule at t = e epochs.
  "onecycle" is PyTorch's OneCycleLR (max_lr = lr_max) stepped per iteration or per epoch.
  """
  epochs, lr_max = float(config.num_epochs), float(config.lr_max)
  by_epoch = _by_epoch(config)
  if config.lr_schedule == "onecycle":
    to_step, total = _onecycle_step(config, steps_per_epoch)
    initial = lr_max / ONECYCLE_DIV_FACTOR
    return lambda step: _onecycle(to_step(step), total, initial, lr_max,
                                  initial / ONECYCLE_FINAL_DIV_FACTOR)

  def schedule(step):
    if by_epoch:
      t = jnp.asarray(step // steps_per_epoch, jnp.float32)
    else:
      t = (step + 1) / steps_per_epoch
    if config.lr_schedule == "cyclic":  # 0 -> lr_max at 2/5 of training -> 0
      return jnp.interp(t, jnp.array([0.0, 0.4 * epochs, epochs]), jnp.array([0.0, lr_max, 0.0]))
    if config.lr_schedule == "piecewise":  # lr_max, /10 at 50 %, /100 at 75 %
      return jnp.where(t < 0.5 * epochs, lr_max, jnp.where(t < 0.75 * epochs, lr_max / 10,
                                                            lr_max / 100))
    return jnp.full((), lr_max)

  return schedule


def momentum_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int
                      ) -> optax.Schedule | None:
  """The scheduled momentum (SGD) or Adam b1, or None when it is the constant config.momentum.

  OneCycleLR cycles it inversely to the lr, max_momentum -> base_momentum at the lr peak ->
  max_momentum, and so overrides config.momentum (PyTorch's cycle_momentum=True)."""
  if config.lr_schedule != "onecycle":
    return None
  to_step, total = _onecycle_step(config, steps_per_epoch)
  return lambda step: _onecycle(to_step(step), total, ONECYCLE_MAX_MOMENTUM,
                                ONECYCLE_BASE_MOMENTUM, ONECYCLE_MAX_MOMENTUM)


def eps_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """eps at an iteration: linear warm-up over `eps_warmup_epochs` (SVHN), then constant."""
  warmup = float(config.eps_warmup_epochs)

  def schedule(step):
    if warmup <= 0:
      return jnp.asarray(config.eps, jnp.float32)
    t = (step + 1) / steps_per_epoch
    return jnp.asarray(config.eps, jnp.float32) * jnp.minimum(t / warmup, 1.0)

  return schedule


# The paper's lambda(eps) for GradAlign per dataset (docs/algorithms.md §2), as a function of
# e8 = eps * 255 / 8.
PAPER_LAMBDA = {
    "cifar10": lambda e8: 0.02 * 10.0 ** e8,          # 0.2 at 8/255, 2.0 at 16/255
    "svhn_cropped": lambda e8: 1.5625 * 1.6 ** e8,    # 2.5 at 8/255, 3.162 at 12/255
}


def grad_align_lambda(eps: float, dataset: str) -> float:
  """The paper's lambda(eps) for GradAlign on `dataset` (PAPER_LAMBDA); eps in pixel units."""
  if dataset not in PAPER_LAMBDA:
    raise ValueError(f"no published lambda(eps) schedule for dataset {dataset!r}")
  return PAPER_LAMBDA[dataset](eps * 255.0 / 8.0)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Full batches per pass over the training set (the remainder is dropped for fixed shapes)."""
  n = num_train // batch_size
  if n < 1:
    raise ValueError(f"training set of {num_train} examples is smaller than one batch ({batch_size})")
  return n


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch_: int) -> int:
  return int(math.ceil(config.num_epochs * steps_per_epoch_))
