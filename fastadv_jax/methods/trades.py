"""TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
ICML 2019; yaodongyu/TRADES trades.py, train_trades_cifar10.py).

Attack, with BatchNorm in eval mode (running statistics, not updated; the authors call
`model.eval()` around it): start x' = x + `noise` * N(0, 1) (0.001, per-example keys, not
clipped), then `steps` (10) sign-ascent steps of `alpha * eps` on the summed
KL(p(x) || p(x')), p(x) fixed, each projected onto the eps-ball and [0, 1]. The authors' step
is 0.007 at eps 0.031, hence alpha = 0.007 / 0.031 (0.00708 at eps 8/255).

Training loss, in train mode: CE(f(x), y) + beta * mean_i KL(p(x_i) || p(x_i + delta_i)),
beta = 6, with gradients through both the clean and the adversarial outputs (the authors'
KL_sum / batch_size). The CE is the step's training CE (config.label_smoothing, 0 by
default, as the authors'); the KL is averaged over the global batch.

Differences from the authors' code: their three train-mode forwards (x for the CE, x + delta and
x again for the KL) all update the BatchNorm running statistics; here only the clean forward of
the CE does, and the KL reuses its logits (the same values, one forward fewer).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, losses, parallel
from fastadv_jax.methods.base import (AttackInputs, Method, Passes, Perturbation, RegularizerInputs,
                                      RegularizerOutput, check)


@dataclasses.dataclass(frozen=True)
class TRADESArgs:
  """The authors' CIFAR-10 settings."""
  steps: int = 10              # sign steps on the KL
  alpha: float = 0.007 / 0.031  # step = alpha * eps
  beta: float = 6.0            # weight of the KL in the training loss
  noise: float = 0.001         # std of the Gaussian start (pixel units)

  def __post_init__(self):
    check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
    check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
    check(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")


def gaussian_start(keys: jax.Array, x: jax.Array, std: float) -> jax.Array:
  """Per-example std * N(0, 1) of x's shape (independent of the device split)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return std * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], dtype))(keys)


def kl_attack(logits_fn, x: jax.Array, eps, args: TRADESArgs, keys: jax.Array) -> jax.Array:
  """The TRADES perturbation of x for `logits_fn` (the caller passes eval-mode logits)."""
  clean = jax.lax.stop_gradient(logits_fn(x))
  loss_fn = lambda z: losses.kl_divergence(clean, logits_fn(z))  # noqa: E731
  delta0 = gaussian_start(keys, x, args.noise)
  return attacks.pgd(loss_fn, x, eps, args.alpha * eps, args.steps, delta0)


def perturb(inp: AttackInputs) -> Perturbation:
  if inp.eval_logits_fn is None:
    raise ValueError("trades attacks the eval-mode model: AttackInputs.eval_logits_fn is needed")
  return Perturbation(kl_attack(inp.eval_logits_fn, inp.x, inp.eps, inp.args, inp.keys))


def regularizer(inp: RegularizerInputs) -> RegularizerOutput:
  adv_logits, _ = inp.forward(inp.params, inp.x + inp.delta)
  local, value = parallel.global_mean(losses.kl_divergence(inp.logits, adv_logits),
                                      inp.axis_name)
  beta = inp.args.beta
  return RegularizerOutput(beta * local, beta * value, inp.state)


METHODS = (Method("trades", "TRADES: 10-step KL attack in eval mode; clean CE + `beta` (6) x "
                  "KL(p(x) || p(x + delta))", perturb, TRADESArgs, ce_at="clean",
                  regularizer=regularizer, presets={"trades": {}},
                  passes=lambda a: Passes(forward=1, input_grad=a.steps, weight_grad=2)),)
