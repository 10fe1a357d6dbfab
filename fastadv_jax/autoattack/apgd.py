"""APGD, Auto-PGD (Croce & Hein, ICML 2020), L-inf and L2: PGD with momentum and a step size
that halves at checkpoints where progress stalled, restarting from the best point found. (The
L1 threat model runs L1-APGD, apgd_l1.py, through the same components.)

Behaviour of the reference (fra31/auto-attack), kept here:
  - start: L-inf x + eps * t / max|t| with t ~ U(-1, 1)^d; L2 x + eps * t / ||t||_2 with
    t ~ N(0, 1)^d; clipped to [0, 1];
  - step: L-inf step * sign(g), projected by clipping to the eps-box and [0, 1]; L2
    step * g / ||g||_2, projected by scaling x_adv - x down to norm eps (if longer), then clipping
    to [0, 1] (which only shortens it: the result is in the ball and the box, though not the
    closest such point);
  - step size 2 eps; momentum 0.75 from the second iteration on;
  - checkpoints after k_0 = 22 % of the iterations, then after windows shrinking by 3 % down to
    6 % (for 100 iterations: after iterations 22, 41, 57, 70, 80, 87, 93, 99);
  - at a checkpoint an example's step halves and its iterate restarts from its best point (and
    best gradient) if its loss increased in at most 75 % of the window's steps, or if its step
    was not halved at the last checkpoint and its best loss has not improved since;
  - the adversarial example kept is the last iterate that is misclassified.
Every example is its own attack: per-example step sizes, best points and random starts (keyed by
the example's position), so a result does not depend on the batch it ran in.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import randomness
from fastadv_jax.autoattack import apgd_l1, component
from fastadv_jax.autoattack import losses as aa_losses

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, key) -> logits


def checkpoint_schedule(steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(is_checkpoint, window) per iteration: where the step-size rule runs, over how many steps."""
  window, w_min, shrink = (max(int(f * steps), 1) for f in (0.22, 0.06, 0.03))
  is_ckpt, windows = np.zeros(steps, bool), np.zeros(steps, np.int32)
  i = window - 1
  while i < steps:
    is_ckpt[i], windows[i] = True, window
    window = max(window - shrink, w_min)
    i += window
  return is_ckpt, windows


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _linf_start(keys: jax.Array, x: jax.Array, eps) -> jax.Array:
  t = randomness.uniform_like(keys, x, -1.0, 1.0)
  t_max = jnp.max(jnp.abs(t).reshape(t.shape[0], -1), axis=1)
  return jnp.clip(x + eps * t / _bcast(t_max, x), 0.0, 1.0)


def _l2_norm(v: jax.Array) -> jax.Array:
  """Per-example Euclidean norm, broadcastable against v."""
  return _bcast(jnp.sqrt(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1)), v)


def _l2_start(keys: jax.Array, x: jax.Array, eps) -> jax.Array:
  t = randomness.normal_like(keys, x)
  return jnp.clip(x + eps * t / (_l2_norm(t) + 1e-12), 0.0, 1.0)


def _project(z: jax.Array, x: jax.Array, eps) -> jax.Array:
  return jnp.clip(jnp.clip(z, x - eps, x + eps), 0.0, 1.0)


def _project_l2(z: jax.Array, x: jax.Array, eps) -> jax.Array:
  """The reference's L2 projection: x + d / ||d|| * min(eps, ||d||), clipped to [0, 1]."""
  d = z - x
  norm = _l2_norm(d)
  return jnp.clip(x + d / (norm + 1e-12) * jnp.minimum(eps, norm), 0.0, 1.0)


def _start(keys: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  return _linf_start(keys, x, eps) if norm == "Linf" else _l2_start(keys, x, eps)


def _momentum_step(s: dict, x: jax.Array, eps, a, norm: str) -> jax.Array:
  """The gradient step from s["x_adv"], projected, then the momentum mix, projected again."""
  if norm == "Linf":
    z = _project(s["x_adv"] + _bcast(s["step"], x) * jnp.sign(s["grad"]), x, eps)
    return _project(s["x_adv"] + (z - s["x_adv"]) * a + (s["x_adv"] - s["x_prev"]) * (1 - a), x,
                    eps)
  g = s["grad"] / (_l2_norm(s["grad"]) + 1e-12)
  z = _project_l2(s["x_adv"] + _bcast(s["step"], x) * g, x, eps)
  return _project_l2(s["x_adv"] + (z - s["x_adv"]) * a + (s["x_adv"] - s["x_prev"]) * (1 - a),
                     x, eps)


def gradient_fn(logits_fn: LogitsFn, loss: Callable[[jax.Array], jax.Array], eot_iter: int,
                model_key: jax.Array) -> Callable:
  """(z, i) -> (per-example loss, logits, input gradient of the summed loss); with `eot_iter`
  > 1 the gradient is the mean over that many calls of a randomised `logits_fn` (EOT), each
  drawing from `model_key` (one key per call: a randomised model draws for the whole batch)."""

  def total(z, key):
    logits = logits_fn(z, key)
    per_example = loss(logits)
    return jnp.sum(per_example), (per_example, logits)

  def value_and_grad(z, i):
    grads, values = 0.0, None
    for e in range(eot_iter):
      key = jax.random.fold_in(jax.random.fold_in(model_key, i), e)
      (_, values), g = jax.value_and_grad(total, has_aux=True)(z, key)
      grads = grads + g
    return values[0], values[1], grads / eot_iter

  return value_and_grad


def _check_norm(norm: str) -> None:
  if norm not in ("Linf", "L2"):  # L1 runs apgd_l1's init and body
    raise ValueError(f"APGD: norm must be one of {', '.join(component.NORMS)}, got {norm!r}"
                     if norm not in component.NORMS else
                     "APGD's init and body are L-inf and L2 (L1: apgd_l1's, or apgd(norm='L1'))")


def init(grad_fn: Callable, x: jax.Array, y: jax.Array, keys: jax.Array, eps, steps: int,
         norm: str = "Linf") -> dict:
  """The state before iteration 0: a random start and its loss and gradient."""
  _check_norm(norm)
  x_adv = _start(keys, x, eps, norm)
  loss0, logits0, grad0 = grad_fn(x_adv, steps)
  n = y.shape[0]
  return dict(
      x_adv=x_adv, x_prev=x_adv, grad=grad0, x_best=x_adv, grad_best=grad0, loss_best=loss0,
      step=jnp.full((n,), 2.0 * eps, jnp.float32),
      robust=jnp.argmax(logits0, -1) == y, x_best_adv=x_adv,
      history=jnp.zeros((steps, n), jnp.float32),
      loss_best_last=loss0, reduced_last=jnp.ones((n,), bool))


def body(grad_fn: Callable, x: jax.Array, y: jax.Array, eps, i, s: dict, rho: float = 0.75,
         norm: str = "Linf") -> dict:
  """Iteration i: a momentum step, bookkeeping of the best point, and the step-size rule."""
  _check_norm(norm)
  steps = s["history"].shape[0]
  is_ckpt, windows = (jnp.asarray(a) for a in checkpoint_schedule(steps))
  a = jnp.where(i > 0, 0.75, 1.0)
  z = _momentum_step(s, x, eps, a, norm)
  loss_i, logits, grad = grad_fn(z, i)
  wrong = jnp.argmax(logits, -1) != y
  better = loss_i > s["loss_best"]
  s = dict(s, x_prev=s["x_adv"], x_adv=z, grad=grad, robust=s["robust"] & ~wrong,
           x_best_adv=jnp.where(_bcast(wrong, x), z, s["x_best_adv"]),
           x_best=jnp.where(_bcast(better, x), z, s["x_best"]),
           grad_best=jnp.where(_bcast(better, x), grad, s["grad_best"]),
           loss_best=jnp.where(better, loss_i, s["loss_best"]),
           history=s["history"].at[i].set(loss_i))
  return _checkpoint(s, i, is_ckpt[i], windows[i], x, rho)


# The one place the threat model picks the algorithm: L1 runs L1-APGD (apgd_l1.py), whose
# gradient evaluations (stage starts included) are its iterations; L-inf and L2 run init / body.
def _initial(grad_fn: Callable, x: jax.Array, y: jax.Array, keys: jax.Array, eps, steps: int,
             norm: str) -> dict:
  if norm == "L1":
    return apgd_l1.init(grad_fn, x, y, keys, eps, steps)
  return init(grad_fn, x, y, keys, eps, steps, norm)


def _step(grad_fn: Callable, x: jax.Array, y: jax.Array, eps, i, s: dict, steps: int,
          rho: float = 0.75, norm: str = "Linf") -> dict:
  if norm == "L1":
    return apgd_l1.body(grad_fn, x, y, eps, i, s, steps)
  return body(grad_fn, x, y, eps, i, s, rho, norm)


def _iterations(steps: int, norm: str) -> int:
  return apgd_l1.evaluations(steps) if norm == "L1" else steps


def finish(s: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(robust, x_adv): the last misclassified iterate, else the best-loss point."""
  return (jax.lax.stop_gradient(s["robust"]),
          jax.lax.stop_gradient(jnp.where(_bcast(s["robust"], x), s["x_best"], s["x_best_adv"])))


def apgd(logits_fn: LogitsFn, loss: Callable[[jax.Array], jax.Array], x: jax.Array,
         y: jax.Array, keys: jax.Array, eps, steps: int = 100, eot_iter: int = 1,
         rho: float = 0.75, model_key: jax.Array | None = None, norm: str = "Linf"
         ) -> tuple[jax.Array, jax.Array]:
  """APGD maximising `loss(logits) -> (n,)` from per-example `keys`, as one jittable function,
  in the `norm` ("Linf", "L2" or "L1") ball of radius eps (L1: L1-APGD with the large-radius
  schedule, apgd_l1.py; `rho` is not used there).

  Returns (robust (n,) bool: no iterate was misclassified, x_adv: the last misclassified iterate
  where one was found, else the best-loss point), under stop_gradient. (AutoAttack's runner
  drives init / body / finish from the host in blocks of unrolled iterations instead.)
  """
  grad_fn = gradient_fn(logits_fn, loss, eot_iter,
                        jax.random.key(0) if model_key is None else model_key)
  state = _initial(grad_fn, x, y, keys, eps, steps, norm)
  state = jax.lax.fori_loop(0, _iterations(steps, norm),
                            lambda i, s: _step(grad_fn, x, y, eps, i, s, steps, rho, norm), state)
  return finish(state, x)


def _checkpoint(s: dict, i, active, window, x: jax.Array, rho: float) -> dict:
  """The step-size rule at iteration i (a no-op unless `active`)."""
  h = s["history"]
  steps = h.shape[0]
  # increased[j]: loss at step j above the loss at step j - 1 (j = 0 compares with the last row,
  # still zero at the first checkpoint, as in the reference).
  increased = h > jnp.roll(h, 1, axis=0)
  j = jnp.arange(steps)[:, None]
  in_window = (j > i - window) & (j <= i)
  count = jnp.sum(increased & in_window, axis=0)
  oscillating = count <= window * rho
  stalled = ~s["reduced_last"] & (s["loss_best_last"] >= s["loss_best"])
  halve = active & (oscillating | stalled)
  hb = _bcast(halve, x)
  return dict(
      s, step=jnp.where(halve, s["step"] / 2.0, s["step"]),
      x_adv=jnp.where(hb, s["x_best"], s["x_adv"]), grad=jnp.where(hb, s["grad_best"], s["grad"]),
      reduced_last=jnp.where(active, oscillating | stalled, s["reduced_last"]),
      loss_best_last=jnp.where(active, s["loss_best"], s["loss_best_last"]))


def loss_for(name: str, y: jax.Array, target: jax.Array | None = None
             ) -> Callable[[jax.Array], jax.Array]:
  """'ce' | 'dlr' | 'dlr-targeted' as a function of the logits, for `apgd`."""
  if name == "ce":
    return lambda logits: aa_losses.cross_entropy(logits, y)
  if name == "dlr":
    return lambda logits: aa_losses.dlr(logits, y)
  if name == "dlr-targeted":
    return lambda logits: aa_losses.dlr_targeted(logits, y, target)
  raise ValueError(f"unknown APGD loss {name!r}")


# --- AutoAttack components ----------------------------------------------------------------------
def _component_grad_fn(loss: str, ctx: component.Context) -> Callable:
  return gradient_fn(ctx.logits_fn, loss_for(loss, ctx.y, ctx.target), ctx.settings.eot_iter,
                     ctx.model_key)


def _component(name: str, loss: str, targeted: bool, summary: str) -> component.Component:
  """APGD maximising `loss` as a runner component: `settings.apgd_steps` iterations in the
  `settings.norm` ball (L1: L1-APGD's large-radius schedule, apgd_l1.py)."""
  return component.Component(
      name=name,
      init=lambda ctx: _initial(_component_grad_fn(loss, ctx), ctx.x, ctx.y, ctx.keys, ctx.eps,
                                ctx.settings.apgd_steps, ctx.settings.norm),
      body=lambda ctx, i, s: _step(_component_grad_fn(loss, ctx), ctx.x, ctx.y, ctx.eps, i, s,
                                   ctx.settings.apgd_steps, norm=ctx.settings.norm),
      finish=lambda ctx, s: finish(s, ctx.x),  # the same rule for L1
      iterations=lambda settings: _iterations(settings.apgd_steps, settings.norm),
      block=GRADIENT_BLOCK, targeted=targeted, gradient_based=True, summary=summary,
      norms=("Linf", "L2", "L1"))


GRADIENT_BLOCK = 10  # iterations per host call of the gradient-based components
APGD_CE = _component("apgd-ce", "ce", False, "APGD on the cross-entropy")
APGD_T = _component("apgd-t", "dlr-targeted", True, "APGD on the targeted DLR loss")
APGD_DLR = _component("apgd-dlr", "dlr", False, "APGD on the DLR loss")
component.register(APGD_CE, APGD_T, APGD_DLR)
