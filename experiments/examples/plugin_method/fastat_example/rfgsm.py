"""R-FGSM (Tramer et al., "Ensemble Adversarial Training", ICLR 2018) as a fastadv_jax method
defined outside the library.

    x' = clip_[0,1](x + alpha * eps * sign(N(0, I)))
    delta = Proj_(eps-ball, [0,1])(x' - x + (1 - alpha) * eps * sign(grad_x l(x')))

alpha = 0.5 by default (the paper's alpha = eps / 2 in pixel units). The cost is FGSM's: one
input gradient. Importing this module registers the method `rfgsm` and its preset `rfgsm`:
`--config.plugins=fastat_example.rfgsm`, or install the package (its entry point in the group
`fastadv_jax.plugins` then loads it in every fastadv_jax command line).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, methods
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation, check


@dataclasses.dataclass(frozen=True)
class RFGSMArgs:
  """`alpha`: the random step's share of eps (the gradient step gets the rest)."""
  alpha: float = 0.5

  def __post_init__(self):
    check(0.0 <= self.alpha < 1.0, "alpha", f"must be in [0, 1), got {self.alpha}")


def noise_sign(keys: jax.Array, x: jax.Array) -> jax.Array:
  """sign(N(0, I)) per example, from that example's key (so it is reproducible in tests)."""
  return jax.vmap(lambda k, xi: jnp.sign(jax.random.normal(k, xi.shape, xi.dtype)))(keys, x)


def perturb(inp: AttackInputs) -> Perturbation:
  a, x, eps = inp.args, inp.x, inp.eps
  start = attacks.clip_to_box(a.alpha * eps * noise_sign(inp.keys, x), x)
  g = attacks.input_grad(inp.loss_fn, x + start)
  delta = attacks.project(attacks.sign_step(start, g, (1.0 - a.alpha) * eps), x, eps)
  return Perturbation(jax.lax.stop_gradient(delta))


RECORD = Method("rfgsm", "R-FGSM (Tramer et al. 2018): random step `alpha * eps * sign(N(0, I))`"
                ", then an FGSM step of `(1 - alpha) * eps`, projected", perturb, RFGSMArgs,
                presets={"rfgsm": {}})
methods.register(RECORD)
