"""The per-example losses and target choices of AutoAttack (Croce & Hein, ICML 2020).

All take float32 logits (n, K) and integer labels (n,) and return (n,) values that the attacks
*maximise* (APGD) or whose sign decides success (Square's margin).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fastadv_jax import losses

MIN_CLASSES_TARGETED = 4  # the targeted DLR loss reads the 4th-largest logit


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return losses.cross_entropy(logits, y)


def _picked(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
  """z_y - max_{i != y} z_i: positive exactly when y wins (Square minimises it)."""
  others = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return _picked(logits, y) - jnp.max(others, axis=-1)


def dlr(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Difference of Logits Ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12).

  Invariant to shifting and rescaling the logits, so it cannot be saturated the way the
  cross-entropy can (z sorted decreasingly as z_pi1 >= z_pi2 >= ...)."""
  z = jnp.sort(logits, axis=-1)
  return -margin(logits, y) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
  """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)."""
  if logits.shape[-1] < MIN_CLASSES_TARGETED:
    raise ValueError(targeted_error(logits.shape[-1]))
  z = jnp.sort(logits, axis=-1)
  return -(_picked(logits, y) - _picked(logits, target)) / (
      z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def targeted_error(num_classes: int) -> str:
  return (f"the targeted attacks (apgd-t, fab-t) need at least {MIN_CLASSES_TARGETED} classes "
          f"(the targeted DLR loss uses the 4th-largest logit); this model has {num_classes}: "
          "use --attack=apgd-ce,square or the untargeted apgd-dlr")


def kth_class(logits: jax.Array, k) -> jax.Array:
  """The class with the k-th largest logit (k = 1 is the prediction; k may be traced): the
  reference's target number k - 1 is `kth_class(clean_logits, k)` for k = 2..num_targets + 1."""
  order = jnp.argsort(logits, axis=-1)
  return jnp.take(order, logits.shape[-1] - k, axis=-1)
