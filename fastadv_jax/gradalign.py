"""GradAlign (Andriushchenko & Flammarion, NeurIPS 2020): the gradient-alignment regulariser.

    Omega = E_(x,y) E_(eta ~ U[-eps, eps]^d) [1 - cos(grad_x l(x, y), grad_x l(x + eta, y))]

g1 is the input gradient at the clean point (by default its gradient is stopped, as in the
original code, which reuses FGSM's gradient); g2, at x + eta, is differentiated end-to-end
(double backpropagation). The cosine is per example, in float32, over the flattened input.
Examples where either gradient is exactly zero have no defined cosine: they are masked out of
the mean, through a double-`where` so that neither the value nor its gradient is ever NaN.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, losses, randomness

__all__ = ["Term", "gradalign_regularizer", "gradient_alignment",
           "input_gradients", "masked_cosine", "regularizer_by_jvp", "term"]


def masked_cosine(g1: jax.Array, g2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-example cosine of two gradient batches, and the mask of examples where it is defined."""
  a = losses.at_least_f32(g1.reshape(g1.shape[0], -1))
  b = losses.at_least_f32(g2.reshape(g2.shape[0], -1))
  na, nb = jnp.sum(a * a, -1), jnp.sum(b * b, -1)
  mask = (na > 0) & (nb > 0)
  # Safe denominators where masked: the discarded branch must have a finite gradient too.
  denom = jnp.sqrt(jnp.where(mask, na, 1.0)) * jnp.sqrt(jnp.where(mask, nb, 1.0))
  cos = jnp.where(mask, jnp.sum(a * b, -1) / denom, 0.0)
  return cos, mask


def input_gradients(loss_fn: attacks.LossFn, x: jax.Array, keys: jax.Array, eps,
                    g1: jax.Array | None = None, backprop_g1: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
  """(g1, g2): input gradients at x and at x + eta, eta ~ U[-eps, eps] (not clipped to [0, 1]).

  Pass `g1` to reuse a gradient already computed at the clean point (FGSM from zero init).
  """
  if g1 is None or backprop_g1:
    g1 = attacks.input_grad(loss_fn, x)
  if not backprop_g1:
    g1 = jax.lax.stop_gradient(g1)
  eta = randomness.uniform_like(keys, x, -eps, eps)
  g2 = attacks.input_grad(loss_fn, x + eta)
  return g1, g2


def gradalign_regularizer(cos: jax.Array, mask: jax.Array, lam, axis_name: str | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """lambda * (1 - masked mean cosine) over the global batch.

  Returns (local_loss, reg): `local_loss` is this device's share, scaled so that averaging the
  devices' parameter gradients (pmean) gives the gradient of the global `reg` exactly, even
  when devices mask out different numbers of examples; `reg` is the global value to log.
  """
  cos_sum = jnp.sum(jnp.where(mask, cos, 0.0))
  count = jax.lax.stop_gradient(jnp.sum(mask.astype(jnp.float32)))
  n_devices = 1
  global_count = count
  if axis_name is not None:
    global_count = jax.lax.psum(count, axis_name)
    n_devices = jax.lax.psum(1, axis_name)
  safe_count = jnp.maximum(global_count, 1.0)
  local_share = lam * (count - cos_sum) / safe_count  # sums to lam * (1 - mean cos) over devices
  reg = local_share if axis_name is None else jax.lax.psum(jax.lax.stop_gradient(local_share),
                                                            axis_name)
  return n_devices * local_share, reg


def regularizer_by_jvp(loss_fn: attacks.LossFn, x: jax.Array, keys: jax.Array, eps,
                       g1: jax.Array | None, lam, axis_name: str | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """GradAlign with its parameter gradient as the reverse derivative of a forward-mode one.

  With v = d reg / d g2 held fixed, d reg / d theta = v . d g2 / d theta = d/d theta of the
  directional derivative jvp_x(sum l)(x + eta; v): reverse over forward mode instead of reverse
  over reverse (double backpropagation). The returned local term has the value of
  `gradalign_regularizer`'s and the same parameter gradient (up to rounding); g1's gradient is
  stopped (`backprop_g1` is not supported here). Returns (local, reg) as that function.
  """
  g1 = jax.lax.stop_gradient(attacks.input_grad(loss_fn, x) if g1 is None else g1)
  z = x + randomness.uniform_like(keys, x, -eps, eps)
  g2 = jax.lax.stop_gradient(attacks.input_grad(loss_fn, z))

  def local_and_reg(g2_):
    return gradalign_regularizer(*masked_cosine(g1, g2_), lam, axis_name)

  (local, reg), v = jax.value_and_grad(local_and_reg, has_aux=True)(g2)
  v = jax.lax.stop_gradient(v)
  _, directional = jax.jvp(lambda zz: jnp.sum(loss_fn(zz)), (z,), (v.astype(z.dtype),))
  local = jax.lax.stop_gradient(local) + directional - jax.lax.stop_gradient(directional)
  return local, reg


def gradient_alignment(loss_fn: attacks.LossFn, x: jax.Array, keys: jax.Array, eps
                       ) -> jax.Array:
  """Diagnostic: masked mean of cos(grad l(x), grad l(x + eta)) over the batch."""
  g1, g2 = input_gradients(loss_fn, x, keys, eps)
  cos, mask = masked_cosine(g1, g2)
  return jnp.sum(jnp.where(mask, cos, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


class Term(NamedTuple):
  loss: jax.Array    # add this to the objective you differentiate (this device's share)
  value: jax.Array   # lambda * (1 - mean cosine) over the global batch, to log


def term(loss_fn: attacks.LossFn, x: jax.Array, key: jax.Array, eps, lam=1.0, *,
         g1: jax.Array | None = None, backprop_g1: bool = False,
         derivative: str = "double_backprop", axis_name: str | None = None) -> Term:
  """The GradAlign term for any model: lambda * (1 - masked mean cos(grad l(x), grad l(x + eta))).

  Args:
    loss_fn: x (B, ...) -> per-example loss (B,), closed over the weights you differentiate
      (a Flax linen `apply`, an NNX module, an Equinox model or plain JAX).
    x: the clean batch, pixels in [0, 1].
    key: one PRNG key for the batch (eta is drawn per example from fold_in(key, index)), or
      (B,) per-example keys.
    eps: L-inf radius in pixel units; eta ~ U[-eps, eps]^d (not clipped to [0, 1]).
    lam: the weight lambda (the paper's CIFAR-10 schedule: schedules.grad_align_lambda).
    g1: the input gradient at x if you have it (FGSM from zero computes it); its gradient is
      stopped unless `backprop_g1`.
    derivative: "double_backprop" (reverse over reverse, as the original) or "jvp" (reverse over
      forward; same value and gradient up to rounding, faster for ResNets on CPU).
    axis_name: the device axis inside pmap / shard_map: `loss` is then this device's share, so
      that the mean of the devices' parameter gradients is the gradient of the global term.
  Returns:
    Term(loss, value); without an axis both are the same number.
  """
  keys = randomness.batch_keys(key, x.shape[0], axis_name)
  if derivative == "jvp":
    if backprop_g1:
      raise ValueError("derivative='jvp' does not differentiate through g1; use "
                       "derivative='double_backprop' with backprop_g1=True")
    return Term(*regularizer_by_jvp(loss_fn, x, keys, eps, g1, lam, axis_name))
  if derivative != "double_backprop":
    raise ValueError(f"derivative must be 'double_backprop' or 'jvp', got {derivative!r}")
  g1, g2 = input_gradients(loss_fn, x, keys, eps, g1=g1, backprop_g1=backprop_g1)
  return Term(*gradalign_regularizer(*masked_cosine(g1, g2), lam, axis_name))
