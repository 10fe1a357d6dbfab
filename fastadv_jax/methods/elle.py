"""ELLE and ELLE-A (Abad Rocamora et al., "Efficient local linearity regularization to overcome
catastrophic overfitting", ICLR 2024; LIONS-EPFL/ELLE).

Training loss: CE(x + delta_FGSM) + lambda * mean_i (l(x_c) - ((1 - a) l(x_a) + a l(x_b)))^2,
with x_a, x_b ~ U(x +- eps) (not clipped to [0, 1], as the authors), a ~ U[0, 1] per example and
x_c = (1 - a) x_a + a x_b: the local linearity error of the loss. One extra forward pass on a
3B batch (BatchNorm statistics over the three points, as the authors' concatenated batch), no
double backpropagation. The FGSM is from zero with step eps (the authors' scripts).
- ELLE: lambda by eps as the authors' scripts set it: 1000 (eps <= 8/255), 5000 (up to 20/255),
  10000 above (`lam`, derived from eps after the config's overrides).
- ELLE-A: lambda starts at 0; after each step it jumps to `lam_aux` (4000) when that step's
  linearity error exceeds mean + `sensitivity` (2) x std of all earlier errors (population
  std, at least 3 earlier errors), and otherwise decays by `decay` (0.99). The errors' mean
  and variance are kept as running (Welford) sums in the train state, so a resumed run continues
  them exactly. (The authors' loop calls optimizer.step() twice per batch; this one steps once.)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fastadv_jax import losses, parallel, randomness
from fastadv_jax.methods import fgsm
from fastadv_jax.methods.base import Method, Passes, RegularizerInputs, RegularizerOutput, check


@dataclasses.dataclass(frozen=True)
class ELLEArgs:
  """FGSM from zero with step eps, and the linearity error's weight (1000 at eps <= 8/255; the
  config files set it from eps with `elle_lambda`)."""
  alpha: float = 1.0   # FGSM step = alpha * eps
  lam: float = 1000.0  # weight of the local-linearity error

  def __post_init__(self):
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
    check(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")


@dataclasses.dataclass(frozen=True)
class ELLEAArgs:
  """ELLE-A's adaptive weight, the authors' values."""
  alpha: float = 1.0        # FGSM step = alpha * eps
  lam_aux: float = 4000.0   # lambda after an error spike
  decay: float = 0.99       # lambda decay per step without a spike
  sensitivity: float = 2.0  # spike = error > mean + sensitivity x std of the earlier errors

  def __post_init__(self):
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
    check(self.lam_aux >= 0, "lam_aux", f"must be >= 0, got {self.lam_aux}")
    check(0 < self.decay <= 1, "decay", f"must be in (0, 1], got {self.decay}")
    check(self.sensitivity >= 0, "sensitivity", f"must be >= 0, got {self.sensitivity}")


def elle_lambda(eps: float) -> float:
  """The authors' lambda for a given eps (pixel units)."""
  e = eps * 255.0
  return 1000.0 if e <= 8.0 + 1e-6 else 5000.0 if e <= 20.0 + 1e-6 else 10000.0


def linearity_error(batch_loss: Callable[[jax.Array], jax.Array], x: jax.Array,
                    keys: jax.Array, eps) -> jax.Array:
  """Per-example squared local-linearity error of a loss at a random triplet in the eps-ball.

  `batch_loss` maps the stacked (3B, ...) points [x_a; x_b; x_c] to their (3B,) losses in one
  pass. Zero for a loss that is affine in x; -a (1 - a) ||x_a - x_b||^2 inside the square for
  ||x||^2.
  """
  ka, kb, kalpha = randomness.split_keys(keys, 3)
  x_a = x + randomness.uniform_like(ka, x, -eps, eps)
  x_b = x + randomness.uniform_like(kb, x, -eps, eps)
  a = randomness.uniform_like(kalpha, x[:, :1].reshape(-1, 1), 0.0, 1.0).reshape(-1)
  a_x = a.reshape((-1,) + (1,) * (x.ndim - 1))
  x_c = (1.0 - a_x) * x_a + a_x * x_b
  l_a, l_b, l_c = jnp.split(batch_loss(jnp.concatenate([x_a, x_b, x_c])), 3)
  return jnp.square(l_c - ((1.0 - a) * l_a + a * l_b))


def _regularizer(lam_of):
  def regularizer(inp: RegularizerInputs) -> RegularizerOutput:
    y3 = jnp.tile(inp.y, 3)
    batch_loss = lambda z: losses.cross_entropy(inp.forward(inp.params, z)[0], y3)  # noqa: E731
    err = linearity_error(batch_loss, inp.x, inp.keys, inp.eps)
    local, value = parallel.global_mean(err, inp.axis_name)
    lam, state = lam_of(inp, value)
    return RegularizerOutput(lam * local, lam * value, state)
  return regularizer


def _constant_lambda(inp: RegularizerInputs, err):
  del err
  return inp.args.lam, inp.state


def _adaptive_lambda(inp: RegularizerInputs, err):
  """ELLE-A: this step uses the current lambda; the next one depends on this step's error."""
  a, s = inp.args, inp.state
  err = jax.lax.stop_gradient(err)
  std = jnp.sqrt(s["m2"] / jnp.maximum(s["n"], 1.0))
  spike = (s["n"] > 2) & (err > s["mean"] + a.sensitivity * std)
  next_lam = jnp.where(spike, jnp.float32(a.lam_aux), s["lam"] * a.decay)
  n = s["n"] + 1.0
  mean = s["mean"] + (err - s["mean"]) / n
  m2 = s["m2"] + (err - s["mean"]) * (err - mean)
  return s["lam"], {"lam": next_lam, "n": n, "mean": mean, "m2": m2}


def _init_adaptive(args):
  del args
  zero = jnp.zeros((), jnp.float32)
  return {"lam": zero, "n": zero, "mean": zero, "m2": zero}


# FGSM, the training loss at x + delta, and the loss at the 3B triplet, differentiated.
ELLE_PASSES = Passes(input_grad=1, weight_grad=1 + 3)

METHODS = (
    Method("elle", "FGSM + lambda x the loss's local-linearity error (ELLE), lambda(eps) as the "
           "authors", fgsm.perturb, ELLEArgs, regularizer=_regularizer(_constant_lambda),
           derived=lambda c: {"lam": elle_lambda(c.eps)}, presets={"elle": {}},
           passes=lambda a: ELLE_PASSES),
    Method("elle_a", "ELLE with the adaptive lambda (ELLE-A): 0, jumps to `lam_aux` when "
           "the error spikes, else decays", fgsm.perturb, ELLEAArgs,
           regularizer=_regularizer(_adaptive_lambda),
           init_state=_init_adaptive, presets={"elle_a": {}}, passes=lambda a: ELLE_PASSES),
)
