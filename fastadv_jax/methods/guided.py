"""GAT and NuAT (Sriramanan et al., NeurIPS 2020 and NeurIPS 2021; val-iisc/GAMA-GAT, NuAT).

Both start from a random vertex of the (`init` * eps)-box (Bernoulli +-eps/2), take one
sign step of `alpha * eps` (eps) on a guided loss, and project onto the eps-ball and [0, 1].
The guided term is used on every other iteration (the authors' `alt = counter % 2`). The weights
are trained on the *clean* cross-entropy plus a regulariser that ties the adversarial output to
the clean one:
- GAT:  CE(x) + `lam` (10) * mean_i ||softmax f(x_i) - softmax f(x_i + delta_i)||^2; the
  attack's guided term is the same squared distance, weighted by `lam`.
- NuAT: CE(x) + lambda_t * ||f(x) - f(x + delta)||_* / B, the nuclear norm of the global batch's
  logit differences; lambda_t ramps linearly from 0 to `lam_max` (4.5) over the first
  `ramp` (0.9) of training (the authors ramp per epoch over 90 of 100 epochs) and is also
  the attack's weight. The nuclear norm couples examples: the devices' slices are gathered so an
  N-device step equals the 1-device step.
Differences from the authors' code: their attack pass runs BatchNorm in eval mode (running
statistics); here, as for every method, attack passes use the batch statistics. GAT's 2020
schedule multiplies lambda by 4 for its last 15 epochs (of 100); that step is not reproduced.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, losses, parallel, randomness
from fastadv_jax.methods.base import (AttackInputs, Method, Passes, Perturbation, RegularizerInputs,
                                      RegularizerOutput, check)


def _check_common(args) -> None:
  check(args.alpha > 0, "alpha", f"must be > 0, got {args.alpha}")
  check(0 <= args.init <= 1, "init", f"must be in [0, 1], got {args.init}")


@dataclasses.dataclass(frozen=True)
class GATArgs:
  """The authors' values: Bernoulli start +-eps/2, step eps, weight 10."""
  alpha: float = 1.0   # step = alpha * eps
  init: float = 0.5    # Bernoulli start +-init * eps
  lam: float = 10.0    # weight of the softmax distance (attack and training loss)

  def __post_init__(self):
    _check_common(self)
    check(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")


@dataclasses.dataclass(frozen=True)
class NuATArgs:
  """The authors' values: Bernoulli start +-eps/2, step eps, lambda ramped 0 -> 4.5 over 90 %."""
  alpha: float = 1.0    # step = alpha * eps
  init: float = 0.5     # Bernoulli start +-init * eps
  lam_max: float = 4.5  # final weight of the nuclear norm
  ramp: float = 0.9     # fraction of training over which lambda ramps up from 0

  def __post_init__(self):
    _check_common(self)
    check(self.lam_max >= 0, "lam_max", f"must be >= 0, got {self.lam_max}")
    check(0 < self.ramp <= 1, "ramp", f"must be in (0, 1], got {self.ramp}")


def _softmax_distance(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """Per-example squared L2 distance between the two softmax outputs (float32)."""
  pa = jax.nn.softmax(losses.at_least_f32(logits_a))
  pb = jax.nn.softmax(losses.at_least_f32(logits_b))
  return jnp.sum(jnp.square(pa - pb), axis=-1)


def nuclear_norm(logit_diff: jax.Array, axis_name: str | None) -> jax.Array:
  """||D||_* / B of the global batch's logit differences (B x classes)."""
  d = parallel.gather_batch(losses.at_least_f32(logit_diff), axis_name)
  return jnp.sum(jnp.linalg.svd(d, compute_uv=False)) / d.shape[0]


def nuat_lambda(args: NuATArgs, progress: jax.Array) -> jax.Array:
  return args.lam_max * jnp.minimum(progress / args.ramp, 1.0)


def _guided_perturb(guided_term):
  """One guided sign step from a Bernoulli start; `guided_term(inp, clean_logits, logits)` is
  the extra attack loss, summed over this device's examples."""

  def perturb(inp: AttackInputs) -> Perturbation:
    a, x = inp.args, inp.x
    u = randomness.uniform_like(inp.keys, x, -1.0, 1.0)
    delta0 = attacks.clip_to_box(a.init * inp.eps * jnp.sign(u), x)
    clean_logits = jax.lax.stop_gradient(inp.logits_fn(x))
    use_guide = (inp.step % 2 == 1).astype(jnp.float32)

    def attack_loss(z):
      logits = inp.logits_fn(z)
      ce = jnp.sum(losses.cross_entropy(logits, inp.y))
      return ce + use_guide * guided_term(inp, clean_logits, logits)

    g = jax.grad(attack_loss)(x + delta0)
    delta = attacks.project(attacks.sign_step(delta0, g, a.alpha * inp.eps), x, inp.eps)
    return Perturbation(jax.lax.stop_gradient(delta))

  return perturb


def _gat_attack_term(inp: AttackInputs, clean_logits, logits):
  # The authors' guided loss is mean-CE + lambda * mean distance; with the summed CE used here
  # for batch-size independence, the distance is summed too (same ratio of the two terms).
  return inp.args.lam * jnp.sum(_softmax_distance(clean_logits, logits))


def _nuat_attack_term(inp: AttackInputs, clean_logits, logits):
  # Authors: mean-CE + lambda * ||D||_* / B. Against the summed CE that is lambda * ||D||_*,
  # divided by the device count because the gathered norm's gradient reaches each slice once
  # per device: lambda * B / n_dev * (||D||_* / B) = lambda * (local batch) * nuclear_norm.
  lam = nuat_lambda(inp.args, inp.progress)
  return lam * logits.shape[0] * nuclear_norm(logits - clean_logits, inp.axis_name)


def _gat_regularizer(inp: RegularizerInputs) -> RegularizerOutput:
  adv_logits, _ = inp.forward(inp.params, inp.x + inp.delta)
  local, value = parallel.global_mean(_softmax_distance(inp.logits, adv_logits), inp.axis_name)
  lam = inp.args.lam
  return RegularizerOutput(lam * local, lam * value, inp.state)


def _nuat_regularizer(inp: RegularizerInputs) -> RegularizerOutput:
  adv_logits, _ = inp.forward(inp.params, inp.x + inp.delta)
  lam = nuat_lambda(inp.args, inp.progress)
  # Every device computes the same global norm; its gradient, gathered back and averaged over
  # devices (pmean), is the global norm's gradient: the local share is the value itself.
  norm = nuclear_norm(adv_logits - inp.logits, inp.axis_name)
  return RegularizerOutput(lam * norm, lam * jax.lax.stop_gradient(norm), inp.state)


# The clean logits the guide compares with, the guided attack step, and the training loss at x
# and at x + delta.
GUIDED_PASSES = Passes(forward=1, input_grad=1, weight_grad=2)

METHODS = (
    Method("gat", "GAT: guided one-step attack from a Bernoulli start; clean CE + `lam` x "
           "softmax distance", _guided_perturb(_gat_attack_term), GATArgs,
           ce_at="clean", regularizer=_gat_regularizer, presets={"gat": {}},
           passes=lambda a: GUIDED_PASSES),
    Method("nuat", "NuAT: nuclear-norm guided attack; clean CE + ramped lambda x nuclear norm of "
           "the logit differences", _guided_perturb(_nuat_attack_term), NuATArgs,
           ce_at="clean", regularizer=_nuat_regularizer, presets={"nuat": {}},
           passes=lambda a: GUIDED_PASSES),
)
