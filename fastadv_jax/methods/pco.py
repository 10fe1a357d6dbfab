"""FGSM-PCO (Wang et al., "Preventing Catastrophic Overfitting in Fast Adversarial Training: A
Bi-level Optimization Perspective", ECCV 2024; HandingWangXDGroup/FGSM-PCO FGSM-PCO.py, and the
2026 fast-AT benchmark's fast_at/fgsm_pco.py, whose rules this follows).

Every training example keeps its last perturbation delta_bar (initialised to eps sign(U) on its
first visit, never reset). With t the soft targets (`target` = 0.6 on the label, 0.4 / (C - 1)
elsewhere) and CE_t the cross-entropy against them:
  z0    = f(x + delta_bar)                       (not clipped to [0, 1], as the code)
  c     = clip(1 - softmax(z0)_y, 0, 1)          (per example)
  delta = P(delta_bar + eps sign(grad_x CE_t(z0)))   (P: onto the eps-ball and [0, 1])
  X_new = c (x + delta_bar) + (1 - c) (x + `beta` delta)   (beta 1.5, not clipped)
  loss  = CE_t(f(X_new)) + `lam` * |MSE(f(x + delta), z0) - MSE(f(x + delta), f(X_new))|
and delta_bar <- delta. z0 is recomputed with the weights inside the loss and c is not detached:
the gradient reaches z0 through c in X_new as well as through the MSE. MSE is the mean over the
global batch x classes, each of the two taken over the global batch before the absolute value,
so an N-device step equals the 1-device step.

Label smoothing: with config.label_smoothing = s > 0 the soft targets are smoothed once more by
PyTorch's rule, t' = (1 - s) t + s / C, in the training loss and the attack, as the benchmark's
`CrossEntropyLoss(label_smoothing=0.4)` does to them (true class 0.6 -> 0.40); s = 0 is the
authors' own repository. The attack takes config.label_smoothing too (the benchmark uses one
criterion for both); config.label_smoothing_attack is not consulted.

Memory: one float32 buffer of the input's shape per training example (602 MB for the
benchmark's 49,000 CIFAR-10 images), spread over the devices (parallel.example_rows).
Differences from the authors' code: BatchNorm runs on the global batch's statistics in every pass
and only the pass at X_new updates the running statistics (theirs: all three train-mode forwards
do); the attack's input gradient is of the summed soft CE (theirs: mean; only its sign is used);
one `target` serves the attack and the training loss (the benchmark's default for both; the
original repository takes the attack's from its `--factor` argument and trains on 0.6).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, losses, parallel
from fastadv_jax.methods.base import (AttackInputs, CELossInputs, Method, Passes, Perturbation,
                                      RegularizerInputs, RegularizerOutput, check)
from fastadv_jax.methods.pgi import mse_per_example, sign_prior


@dataclasses.dataclass(frozen=True)
class PCOArgs:
  """The authors' values: soft target 0.6, mixing step 1.5 eps, weight 10."""
  target: float = 0.6   # soft-target probability on the label
  beta: float = 1.5     # X_new's adversarial end is x + beta * delta
  lam: float = 10.0     # weight of the MSE difference

  def __post_init__(self):
    check(0 < self.target <= 1, "target", f"must be in (0, 1], got {self.target}")
    check(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
    check(self.lam >= 0, "lam", f"must be >= 0, got {self.lam}")


def example_state(args: PCOArgs, input_shape: tuple[int, ...]) -> dict[str, Any]:
  """One row: delta_bar, and whether it has been initialised."""
  del args
  return {"delta": jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32),
          "seen": jax.ShapeDtypeStruct((), jnp.int32)}


def soft_targets(y: jax.Array, num_classes: int, target: float, label_smoothing: float = 0.0,
                 dtype: Any = jnp.float32) -> jax.Array:
  """(n, C): `target` on the label, (1 - target) / (C - 1) elsewhere; then PyTorch's label
  smoothing s: (1 - s) t + s / C."""
  onehot = jax.nn.one_hot(y, num_classes, dtype=dtype)
  t = onehot * target + (1.0 - onehot) * (1.0 - target) / (num_classes - 1)
  return t * (1.0 - label_smoothing) + label_smoothing / num_classes


def soft_ce(logits: jax.Array, y: jax.Array, target: float, label_smoothing: float
            ) -> jax.Array:
  """Per-example cross-entropy against the (smoothed) soft targets."""
  logits = losses.at_least_f32(logits)
  return losses.soft_cross_entropy(
      logits, soft_targets(y, logits.shape[-1], target, label_smoothing, logits.dtype))


def perturb(inp: AttackInputs) -> Perturbation:
  """delta from the example's delta_bar; delta_bar goes to the loss (aux), delta to its row.
  Without rows (`methods.perturb`) every example is on its first visit."""
  a, x, eps = inp.args, inp.x, inp.eps
  rows = inp.example_rows
  if rows is None:
    rows = {"delta": jnp.zeros_like(x), "seen": jnp.zeros((x.shape[0],), jnp.int32)}
  fresh = (rows["seen"] == 0).reshape((-1,) + (1,) * (x.ndim - 1))
  delta_bar = jnp.where(fresh, sign_prior(inp.keys, x, eps), rows["delta"])
  g = jax.grad(lambda z: jnp.sum(soft_ce(inp.logits_fn(z), inp.y, a.target,
                                         inp.label_smoothing)))(x + delta_bar)
  delta = jax.lax.stop_gradient(attacks.project(attacks.sign_step(delta_bar, g, eps), x, eps))
  new_rows = {"delta": delta, "seen": jnp.ones((x.shape[0],), jnp.int32)}
  return Perturbation(delta, example_rows=new_rows, aux=jax.lax.stop_gradient(delta_bar))


def mixture(inp: RegularizerInputs) -> tuple[jax.Array, jax.Array]:
  """(X_new, z0) as functions of the weights (the training input, `Method.ce_at`)."""
  delta_bar = inp.aux
  z0, _ = inp.forward(inp.params, inp.x + delta_bar)
  p_y = jnp.take_along_axis(jax.nn.softmax(losses.at_least_f32(z0)), inp.y[:, None], axis=-1)
  c = jnp.clip(1.0 - p_y[:, 0], 0.0, 1.0).reshape((-1,) + (1,) * (inp.x.ndim - 1))
  x_new = c * (inp.x + delta_bar) + (1.0 - c) * (inp.x + inp.args.beta * inp.delta)
  return x_new.astype(inp.x.dtype), z0


def train_ce(inp: CELossInputs) -> jax.Array:
  return soft_ce(inp.logits, inp.y, inp.args.target, inp.label_smoothing)


def regularizer(inp: RegularizerInputs) -> RegularizerOutput:
  """lam * |MSE(f(x + delta), z0) - MSE(f(x + delta), f(X_new))|, each MSE over the global
  batch: the local share is sign(global difference) x the difference of the local shares."""
  adv_logits, _ = inp.forward(inp.params, inp.x + inp.delta)
  local_0, value_0 = parallel.global_mean(mse_per_example(adv_logits, inp.ce_aux), inp.axis_name)
  local_n, value_n = parallel.global_mean(mse_per_example(adv_logits, inp.logits), inp.axis_name)
  diff = jax.lax.stop_gradient(value_0 - value_n)
  lam = inp.args.lam
  return RegularizerOutput(lam * jnp.sign(diff) * (local_0 - local_n), lam * jnp.abs(diff),
                           inp.state)


METHODS = (
    Method("fgsm_pco", "FGSM-PCO: FGSM from the example's last perturbation; soft-target CE at a "
           "confidence-weighted mixture + `lam` x |MSE difference|", perturb, PCOArgs,
           ce_at=mixture, train_ce=train_ce, regularizer=regularizer,
           example_state=example_state, presets={"fgsm_pco": {}},
           passes=lambda a: Passes(input_grad=1, weight_grad=3)),
)
