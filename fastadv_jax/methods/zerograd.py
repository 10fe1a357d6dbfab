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
import numpy as np

from fastadv_jax import attacks, randomness
from fastadv_jax.methods.base import ONE_STEP, AttackInputs, Method, Passes, Perturbation, check


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
  """Per example, entries with |g| below the q-quantile of |g| -> 0 (`below_quantile`)."""
  below = below_quantile(g.reshape(g.shape[0], -1), q).reshape(g.shape)
  return jnp.where(below, 0.0, g)


def below_quantile(flat: jax.Array, q: float) -> jax.Array:
  """Per row of (B, d) `flat`: which entries have |x| strictly below the row's q-quantile of
  |x|, the quantile as `jnp.quantile` defines it (linear interpolation between the order
  statistics s_lo <= s_hi at floor and ceil of q (d - 1), computed in float32 as there). Below
  it are the entries < s_lo, and those equal to s_lo when the quantile lies strictly above s_lo
  (a fractional position and s_hi > s_lo): decided on the order statistics themselves, so no
  rounding of the interpolated value (which XLA computes with or without a fused multiply-add,
  by platform) can move an entry across. A row holding NaN has no quantile: nothing is below.

  Found by selection, not a sort: XLA:CPU sorts each row with a comparison sort, which made
  ZeroGrad cost 6.85 FGSM steps. Magnitudes are non-negative floats, whose bit patterns as
  int32 are in the same order, so s_lo is the smallest bit pattern v with more than lo
  entries <= v: a bisection over the 31 value bits, each step one comparison and one count
  per entry; s_hi is then s_lo again (ties) or the smallest entry above it."""
  flat = jnp.abs(flat.astype(jnp.float32))
  d = flat.shape[1]
  position = np.float32(q) * np.float32(d - 1)  # as jnp.quantile computes it (static here)
  low = int(np.clip(np.floor(position), 0, d - 1))
  high = int(np.clip(np.ceil(position), 0, d - 1))
  bits = jax.lax.bitcast_convert_type(flat, jnp.int32)  # >= 0; NaN above +inf
  biggest = np.iinfo(np.int32).max

  def bisect(_, bounds):
    below, at = bounds  # invariant: count(bits <= below) <= low < count(bits <= at)
    mid = (below >> 1) + (at >> 1) + (below & at & 1)  # floor of the mean, without overflow
    enough = jnp.sum(bits <= mid[:, None], axis=1) > low
    return jnp.where(enough, below, mid), jnp.where(enough, mid, at)

  start = (jnp.full((flat.shape[0],), -1, jnp.int32),
           jnp.full((flat.shape[0],), biggest, jnp.int32))
  s_lo = jax.lax.fori_loop(0, 31, bisect, start, unroll=True)[1][:, None]
  if high > low:  # the quantile is above s_lo unless s_hi ties with it
    strict = jnp.sum(bits <= s_lo, axis=1, keepdims=True) <= high
  else:
    strict = jnp.zeros_like(s_lo, bool)
  below = (bits < s_lo) | ((bits == s_lo) & strict)
  return below & ~jnp.any(jnp.isnan(flat), axis=1, keepdims=True)


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
           default_init="uniform", presets={"zerograd": {}},
           passes=lambda a: ONE_STEP),
    Method("multigrad", "MultiGrad: sign consensus of the gradients at `samples` (3) "
           "random starts, disagreeing entries zeroed", multigrad, MultiGradArgs,
           presets={"multigrad": {}},
           passes=lambda a: Passes(input_grad=a.samples, weight_grad=1)),
)
