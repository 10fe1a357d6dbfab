"""N-AAER (Lin et al., "Eliminating Catastrophic Overfitting via Abnormal Adversarial Examples
Regularization", NeurIPS 2023; tmllab/2023_NeurIPS_AAER, and the 2026 fast-AT benchmark's
fast_at/aaer.py).

Attack (N-FGSM's): eta ~ U(-k eps, k eps) (k = `noise`, 2), x + eta clipped to [0, 1];
z_b = f(x + eta), l_b its per-example CE (both fixed); one sign step of `alpha * eps` (1.0);
then only the [0, 1] box, no eps-ball projection. z_a = f(x + delta), l_a its CE.

Abnormal adversarial examples are those the step made *less* harmful: A = {l_b > l_a},
N = the rest. With V_S = mean_{i in S} ||z_a,i - z_b,i||^2 the loss is

  mean l_a + lam1 (|A| / n) [lam2 mean_A (l_b - l_a) + lam3 max(V_A - V_N, 0)]

when both A and N are non-empty, else mean l_a; (lam1, lam2, lam3) = (1, 1.5, 0.15) (the
benchmark's N-AAER config). V_N is fixed (the authors' `.item()`). As in both the authors' and
the benchmark's code, l_a is detached inside the lam2 term (their `loss_after`), so that term
only shifts the loss value: its gradient is exactly zero and only lam3 V_A trains the weights.
This is kept as written. The benchmark clips V_A - V_N to +-`var_clamp` (100) before the hinge
(not in the authors' script; 0 turns it off).

Sets, counts and means are over the global batch (the devices' per-example terms are gathered),
so an N-device step equals the 1-device step.

Cross-entropy: both codes use the plain CE for the attack and the training loss; the benchmark
defines a label-smoothed criterion (0.4) but N-AAER never calls it. So this method ignores
`config.label_smoothing` (and `label_smoothing_attack`) and always uses the plain CE.

Differences from the authors' code: the forward at x + eta runs BatchNorm in train mode but, as
for every method here, does not update the running statistics (theirs does); the benchmark's
extra forward for the training accuracy is not made.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, losses, parallel, randomness
from fastadv_jax.methods.base import (ONE_STEP, AttackInputs, CELossInputs, Method, Perturbation,
                                      RegularizerInputs, RegularizerOutput, check)


@dataclasses.dataclass(frozen=True)
class AAERArgs:
  """The benchmark's N-AAER settings (configs/cifar10/n_aaer.yaml)."""
  noise: float = 2.0       # eta ~ U(-noise * eps, noise * eps)
  alpha: float = 1.0       # step = alpha * eps
  lam1: float = 1.0        # overall weight of the abnormal-example terms
  lam2: float = 1.5        # weight of mean_A (l_b - l_a) (zero gradient, see the docstring)
  lam3: float = 0.15       # weight of max(V_A - V_N, 0)
  var_clamp: float = 100.0  # V_A - V_N clipped to +-var_clamp (benchmark); 0: not clipped

  def __post_init__(self):
    check(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
    for f in ("lam1", "lam2", "lam3", "var_clamp"):
      check(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}")


def plain_ce(inp: CELossInputs) -> jax.Array:
  """The unsmoothed CE, whatever config.label_smoothing says (see the module docstring)."""
  return losses.cross_entropy(inp.logits, inp.y)


def perturb(inp: AttackInputs) -> Perturbation:
  a, x = inp.args, inp.x
  k = a.noise * inp.eps
  eta = attacks.clip_to_box(randomness.uniform_like(inp.keys, x, -k, k), x)

  def summed_ce(z):
    logits = inp.logits_fn(z)
    ce = losses.cross_entropy(logits, inp.y)
    return jnp.sum(ce), (logits, ce)

  g, (z_b, l_b) = jax.grad(summed_ce, has_aux=True)(x + eta)
  delta = attacks.clip_to_box(attacks.sign_step(eta, g, a.alpha * inp.eps), x)
  aux = jax.lax.stop_gradient((losses.at_least_f32(z_b), l_b))
  return Perturbation(jax.lax.stop_gradient(delta), aux=aux)


def aaer_term(args: AAERArgs, z_a: jax.Array, z_b: jax.Array, l_a: jax.Array, l_b: jax.Array
              ) -> jax.Array:
  """The abnormal-example regulariser on a whole batch (per-example rows, no device axis).
  Gradients flow only through z_a (l_a enters detached, as in both codes)."""
  l_a = jax.lax.stop_gradient(l_a)
  abnormal = (l_b > l_a).astype(jnp.float32)
  normal = 1.0 - abnormal
  n_a, n_n = jnp.sum(abnormal), jnp.sum(normal)
  variation = jnp.sum(jnp.square(losses.at_least_f32(z_a) - z_b), axis=-1)
  v_a = jnp.sum(abnormal * variation) / jnp.maximum(n_a, 1.0)
  v_n = jax.lax.stop_gradient(jnp.sum(normal * variation) / jnp.maximum(n_n, 1.0))
  ce_a = jnp.sum(abnormal * (l_b - l_a)) / jnp.maximum(n_a, 1.0)
  diff = v_a - v_n
  if args.var_clamp > 0:
    diff = jnp.clip(diff, -args.var_clamp, args.var_clamp)
  term = args.lam1 * (n_a / l_b.shape[0]) * (args.lam2 * ce_a + args.lam3 * jnp.maximum(diff, 0.0))
  return jnp.where((n_a > 0) & (n_n > 0), term, 0.0)


def regularizer(inp: RegularizerInputs) -> RegularizerOutput:
  z_b, l_b = inp.aux
  z_a = inp.logits  # the training forward at x + delta (ce_at "adversarial")
  l_a = losses.cross_entropy(z_a, inp.y)
  g = lambda v: parallel.gather_batch(v, inp.axis_name)  # noqa: E731
  # Every device computes the global term; the gather's gradient reaches each slice once per
  # device and the step's pmean divides that out (as NuAT's nuclear norm): the local share is
  # the value itself.
  term = aaer_term(inp.args, g(losses.at_least_f32(z_a)), g(z_b), g(l_a), g(l_b))
  return RegularizerOutput(term, jax.lax.stop_gradient(term), inp.state)


METHODS = (Method("n_aaer", "N-AAER: N-FGSM attack; plain CE + lam1 |A|/n (lam2 CE gap + lam3 "
                  "hinge of V_A - V_N) on abnormal examples (loss fell after the step)",
                  perturb, AAERArgs, train_ce=plain_ce, regularizer=regularizer,
                  presets={"n_aaer": {}}, passes=lambda a: ONE_STEP),)
