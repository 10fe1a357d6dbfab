"""ZeroGrad and MultiGrad (Golgooni et al., "ZeroGrad: Mitigating and Explaining Catastrophic
Overfitting in FGSM Adversarial Training", 2021; rohban-lab/catastrophic_overfitting).

ZeroGrad (the authors' `qfgsm`): from a uniform start, the input gradient's entries whose
magnitude is below the example's `quantile` (0.4) quantile are zeroed; then one sign step
of `alpha * eps` (2), projected. Zeroed entries keep their random
start (sign(0) = 0).
MultiGrad (`cfgsm`): the signs of the input gradients at `samples` (3) uniform starts
are summed; entries without full agreement are zeroed; delta = `alpha * eps` times the
agreed sign, projected (2 eps then clipped to eps, i.e. eps * sign). The authors compute the
samples' gradients on one concatenated batch (BatchNorm statistics over all of them); here each
sample is its own forward pass with its own batch statistics.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, randomness
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation, check


@dataclasses.dataclass(frozen=True)
class ZeroGradArgs:
  """The authors' CIFAR-10 setting: quantile 0.4, step 2 eps."""
  alpha: float = 2.0      # step = alpha * eps
  quantile: float = 0.4   # per-example quantile of |g| below which g is zeroed

  def __post_init__(self):
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
    check(0 <= self.quantile < 1, "quantile", f"must be in [0, 1), got {self.quantile}")


@dataclasses.dataclass(frozen=True)
class MultiGradArgs:
  """The authors' setting: 3 random starts, step 2 eps (then clipped to the eps-ball)."""
  alpha: float = 2.0      # step = alpha * eps
  samples: int = 3        # random starts whose gradient signs must agree

  def __post_init__(self):
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
    check(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")


def zero_below_quantile(g: jax.Array, q: float) -> jax.Array:
  """Per example, entries with |g| below the q-quantile of |g| (linear interpolation) -> 0."""
  flat = jnp.abs(g.reshape(g.shape[0], -1))
  threshold = jnp.quantile(flat, q, axis=1).reshape((-1,) + (1,) * (g.ndim - 1))
  return jnp.where(jnp.abs(g) < threshold, 0.0, g)


def zerograd(inp: AttackInputs) -> Perturbation:
  a, x = inp.args, inp.x
  delta0 = attacks.init_delta(inp.init, inp.keys, x, inp.eps)
  g = zero_below_quantile(attacks.input_grad(inp.loss_fn, x + delta0), a.quantile)
  delta = attacks.project(attacks.sign_step(delta0, g, a.alpha * inp.eps), x, inp.eps)
  return Perturbation(jax.lax.stop_gradient(delta))


def multigrad(inp: AttackInputs) -> Perturbation:
  a, x = inp.args, inp.x
  n = a.samples
  votes = jnp.zeros_like(x)
  for keys in randomness.split_keys(inp.keys, n):
    delta0 = attacks.init_delta("uniform", keys, x, inp.eps)
    votes = votes + jnp.sign(attacks.input_grad(inp.loss_fn, x + delta0))
  agreed = jnp.where(jnp.abs(votes) < n, 0.0, votes)
  delta = attacks.project(a.alpha * inp.eps * jnp.sign(agreed), x, inp.eps)
  return Perturbation(jax.lax.stop_gradient(delta))


METHODS = (
    Method("zerograd", "ZeroGrad: FGSM-RS whose input-gradient entries below the per-example "
           "`quantile` (0.4) are zeroed; step 2 eps", zerograd, ZeroGradArgs,
           default_init="uniform", presets={"zerograd": {}}),
    Method("multigrad", "MultiGrad: sign consensus of the gradients at `samples` (3) "
           "random starts, disagreeing entries zeroed", multigrad, MultiGradArgs,
           presets={"multigrad": {}}),
)
