"""FGSM-PGI, its MEP variant (Jia et al., "Prior-Guided Adversarial Initialization for Fast
Adversarial Training", ECCV 2022; jiaxiaojunQAQ/FGSM-PGI FGSM_MEP.py, and the 2026 fast-AT
benchmark's fast_at/fgsm_pgi.py, whose rules this follows).

Every training example keeps a prior perturbation delta_bar and a momentum m across epochs:
  x0        = clip01(x + delta_bar)
  g         = grad_x CE(f(x0), y)                 (the attack's label smoothing, if any)
  m         <- g / ||g||_1 + `decay` * m          (||.||_1 of the whole global batch's gradient)
  delta_adv = P(delta_bar + `alpha` eps sign(g))  (P: onto the eps-ball and [0, 1])
  delta_bar <- P(delta_bar + eps sign(m))         (stored with m for the example's next visit)
  loss      = CE(f(x + delta_adv), y) + `lam` * MSE(f(x + delta_adv), f(x0))
with MSE the mean over batch x classes and gradients through both outputs (f(x0) is recomputed
with the weights inside the loss). The buffers start at delta_bar = eps sign(U(-eps, eps)),
m = 0, and restart so at every `reset_every`-th epoch (0, 40, 80 of the benchmark's 100). The
restart is lazy: a row is re-initialised on its first visit in a reset period, which equals
resetting the whole buffer at the period's first epoch, since no row is read before its visit.

FGSM-EP (the paper's variant with delta_bar <- delta_adv) is this code with `decay` = 0 and
`alpha` = 1 (preset `fgsm_ep`): then m = g / ||g||_1 has the signs of g, so the stored
delta_bar is delta_adv. (Only where an entry of g / ||g||_1 underflows to zero, below 1e-38 of
the batch's L1 norm, would the two differ.) The authors' repository ships only MEP.

Memory: two float32 buffers of the input's shape per training example; for the benchmark's
49,000 CIFAR-10 training images 49,000 x 3,072 x 4 B = 602 MB each, 1.2 GB for both, spread over
the devices (parallel.example_rows).
Differences from the authors' code: the L1 norm is taken of the summed-CE gradient (theirs: of the
mean-CE gradient; the normalised momentum is the same); BatchNorm runs on the global batch's
statistics in every pass, and only the training cross-entropy's pass updates the running
statistics (theirs: every train-mode forward does). The original repository feeds normalised
inputs without clipping x0 to [0, 1]; the benchmark's clipping is kept.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, losses, parallel, randomness
from fastadv_jax.methods.base import (AttackInputs, Method, Passes, Perturbation, RegularizerInputs,
                                      RegularizerOutput, check)


@dataclasses.dataclass(frozen=True)
class PGIArgs:
  """The authors' values (MEP): momentum decay 0.3, step eps, MSE weight 10, reset every 40."""
  alpha: float = 1.0       # the training perturbation's step = alpha * eps
  decay: float = 0.3       # momentum decay (0 with alpha 1: the -EP variant)
  lam: float = 10.0        # weight of MSE(f(x + delta_adv), f(x0))
  reset_every: int = 40    # epochs between re-initialisations of the buffers

  def __post_init__(self):
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
    check(self.decay >= 0, "decay", f"must be >= 0, got {self.decay}")
    check(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")
    check(self.reset_every >= 1, "reset_every", f"must be >= 1, got {self.reset_every}")


def example_state(args: PGIArgs, input_shape: tuple[int, ...]) -> dict[str, Any]:
  """One row: delta_bar, m, and the reset period (+ 1) the row was last initialised in."""
  del args
  return {"delta": jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32),
          "momentum": jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32),
          "period": jax.ShapeDtypeStruct((), jnp.int32)}


def _per_example(mask: jax.Array, x: jax.Array) -> jax.Array:
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def sign_prior(keys: jax.Array, x: jax.Array, eps) -> jax.Array:
  """eps * sign(U(-eps, eps)) per example (a random vertex of the ball, not clipped to [0, 1])."""
  return eps * jnp.sign(randomness.uniform_like(keys, x, -1.0, 1.0))


def batch_l1(g: jax.Array, axis_name: str | None) -> jax.Array:
  """||g||_1 of the global batch's gradient (the same on every device)."""
  norm = jnp.sum(jnp.abs(g))
  return norm if axis_name is None else jax.lax.psum(norm, axis_name)


def perturb(inp: AttackInputs) -> Perturbation:
  """delta_adv from the example's prior; the next prior and momentum as its new rows. Without
  rows (`methods.perturb`) every example is on its first visit."""
  a, x, eps = inp.args, inp.x, inp.eps
  period = (jnp.asarray(inp.epoch, jnp.int32) // a.reset_every + 1).astype(jnp.int32)
  n = x.shape[0]
  rows = inp.example_rows
  if rows is None:
    rows = {"delta": jnp.zeros_like(x), "momentum": jnp.zeros_like(x),
            "period": jnp.zeros((n,), jnp.int32)}
  fresh = _per_example(rows["period"] != period, x)
  delta_bar = jnp.where(fresh, sign_prior(inp.keys, x, eps), rows["delta"])
  momentum = jnp.where(fresh, 0.0, rows["momentum"])
  x0 = jnp.clip(x + delta_bar, 0.0, 1.0)
  g = attacks.input_grad(inp.loss_fn, x0)
  norm = batch_l1(g, inp.axis_name)
  momentum = g / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny) + a.decay * momentum
  delta_adv = attacks.project(attacks.sign_step(delta_bar, g, a.alpha * eps), x, eps)
  next_bar = attacks.project(attacks.sign_step(delta_bar, momentum, eps), x, eps)
  new_rows = {"delta": next_bar, "momentum": momentum, "period": jnp.full((n,), period)}
  return Perturbation(jax.lax.stop_gradient(delta_adv),
                      example_rows=jax.lax.stop_gradient(new_rows),
                      aux=jax.lax.stop_gradient(x0))


def mse_per_example(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-example mean over classes of the squared difference (float32): its batch mean is
  PyTorch's MSELoss over batch x classes."""
  d = losses.at_least_f32(a) - losses.at_least_f32(b)
  return jnp.mean(jnp.square(d), axis=-1)


def regularizer(inp: RegularizerInputs) -> RegularizerOutput:
  """lam * MSE(f(x + delta_adv), f(x0)) over the global batch, f(x0) at the weights."""
  start_logits, _ = inp.forward(inp.params, inp.aux)
  local, value = parallel.global_mean(mse_per_example(inp.logits, start_logits), inp.axis_name)
  lam = inp.args.lam
  return RegularizerOutput(lam * local, lam * value, inp.state)


METHODS = (
    Method("fgsm_pgi", "FGSM-PGI (MEP): FGSM from a per-example prior carried by momentum "
           "across epochs; CE + `lam` x MSE(f(x + delta), f(x + prior))", perturb, PGIArgs,
           regularizer=regularizer, example_state=example_state,
           presets={"fgsm_pgi": {}, "fgsm_ep": {"decay": 0.0, "alpha": 1.0}},
           passes=lambda a: Passes(input_grad=1, weight_grad=2)),
)
