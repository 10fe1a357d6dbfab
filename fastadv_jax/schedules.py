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


def lr_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Per-iteration learning rate as the original: t = (step + 1) / steps_per_epoch in epochs."""
  epochs, lr_max = float(config.num_epochs), float(config.lr_max)

  def schedule(step):
    t = (step + 1) / steps_per_epoch
    if config.lr_schedule == "cyclic":  # 0 -> lr_max at 2/5 of training -> 0
      return jnp.interp(t, jnp.array([0.0, 0.4 * epochs, epochs]), jnp.array([0.0, lr_max, 0.0]))
    if config.lr_schedule == "piecewise":  # lr_max, /10 at 50 %, /100 at 75 %
      return jnp.where(t < 0.5 * epochs, lr_max, jnp.where(t < 0.75 * epochs, lr_max / 10,
                                                            lr_max / 100))
    return jnp.full((), lr_max)

  return schedule


def eps_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """eps at an iteration: linear warm-up over `eps_warmup_epochs` (SVHN), then constant."""
  warmup = float(config.eps_warmup_epochs)

  def schedule(step):
    if warmup <= 0:
      return jnp.asarray(config.eps, jnp.float32)
    t = (step + 1) / steps_per_epoch
    return jnp.asarray(config.eps, jnp.float32) * jnp.minimum(t / warmup, 1.0)

  return schedule


def grad_align_lambda(eps: float, dataset: str) -> float:
  """The paper's lambda(eps) for GradAlign (docs/algorithms.md §2); eps in pixel units.

  CIFAR-10: 0.02 * 10**(eps*255/8)  (0.2 at 8/255, 2.0 at 16/255).
  SVHN:     1.5625 * 1.6**(eps*255/8)  (2.5 at 8/255, 3.162 at 12/255).
  """
  e8 = eps * 255.0 / 8.0
  if dataset == "cifar10":
    return 0.02 * 10.0 ** e8
  if dataset == "svhn_cropped":
    return 1.5625 * 1.6 ** e8
  raise ValueError(f"no published lambda(eps) schedule for dataset {dataset!r}")


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Full batches per pass over the training set (the remainder is dropped for fixed shapes)."""
  n = num_train // batch_size
  if n < 1:
    raise ValueError(f"training set of {num_train} examples is smaller than one batch ({batch_size})")
  return n


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch_: int) -> int:
  return int(math.ceil(config.num_epochs * steps_per_epoch_))
