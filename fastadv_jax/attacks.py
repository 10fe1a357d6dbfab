"""L-inf (and, for evaluation, L2) attacks as small pure functions: init, step, project, composed
with lax loops.

`loss_fn(x) -> (n,)` is a per-example loss closed over the model; input gradients are taken of
its sum, so each example's gradient does not depend on the batch size. eps and step sizes are in
pixel units (step sizes here are absolute; callers convert "multiples of eps"). Every returned
perturbation is under stop_gradient: attacks never leak gradients into the weight update.

`norm="L2"` (PGD for evaluation: `pgd`, `pgd_restart`, `pgd_with_restarts`) bounds the
Euclidean norm of the whole perturbation instead: steps along the normalised gradient, the
projection scales delta down to norm eps and then clips to the box (which only shortens it),
and the random start is a uniformly random direction at a radius drawn from U(0, eps) (as
torchattacks' PGDL2; uniform in the ball's volume would put nearly every start on its surface).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fastadv_jax import randomness
from fastadv_jax.runtime import xla_cpu

__all__ = ["NORMS", "LossFn", "check_norm", "clean_correct", "clip_to_box", "fgsm", "init_delta",
           "input_grad", "l2_step", "pgd", "pgd_restart", "pgd_with_restarts", "project",
           "restart_keys", "restart_update", "restarts_init", "sign_step", "to_corner"]

NORMS = ("Linf", "L2")

LossFn = Callable[[jax.Array], jax.Array]


def input_grad(loss_fn: LossFn, x: jax.Array) -> jax.Array:
  """Gradient of the summed per-example loss with respect to the input."""
  return jax.grad(lambda z: jnp.sum(loss_fn(z)))(x)


def clip_to_box(delta: jax.Array, x: jax.Array) -> jax.Array:
  """So that x + delta stays in [0, 1] (no eps-ball)."""
  return jnp.clip(x + delta, 0.0, 1.0) - x


def check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")


def _l2_norm(v: jax.Array) -> jax.Array:
  """Per-example Euclidean norm, shaped to broadcast against v."""
  n = jnp.sqrt(jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1))
  return n.reshape((-1,) + (1,) * (v.ndim - 1))


def project(delta: jax.Array, x: jax.Array, eps, norm: str = "Linf") -> jax.Array:
  """Onto the eps-ball (L-inf: clip per pixel; L2: scale down to norm eps where longer) and so
  that x + delta stays in [0, 1]."""
  if norm == "Linf":
    return clip_to_box(jnp.clip(delta, -eps, eps), x)
  check_norm(norm)
  n = _l2_norm(delta)
  return clip_to_box(delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12)), x)


def init_delta(kind: str, keys: jax.Array | None, x: jax.Array, eps, norm: str = "Linf"
               ) -> jax.Array:
  """zero | uniform (L-inf: U(-eps, eps) per pixel; L2: a uniform direction at radius
  U(0, eps)) | corner (L-inf only: a random vertex, +-eps per pixel); projected."""
  if kind == "zero":
    return jnp.zeros_like(x)
  if norm != "Linf":
    check_norm(norm)
    if kind != "uniform":
      raise ValueError(f"perturbation init {kind!r} is L-inf only; L2 takes zero or uniform")
    direction_keys, radius_keys = randomness.split_keys(keys, 2)
    t = randomness.normal_like(direction_keys, x)
    r = jax.vmap(lambda k: jax.random.uniform(k, (), t.dtype))(radius_keys)
    r = r.reshape((-1,) + (1,) * (x.ndim - 1))
    return project(eps * r * t / jnp.maximum(_l2_norm(t), 1e-12), x, eps, norm)
  u = randomness.uniform_like(keys, x, -1.0, 1.0)
  if kind == "uniform":
    return project(eps * u, x, eps)
  if kind == "corner":
    return project(eps * jnp.sign(u), x, eps)
  raise ValueError(f"unknown perturbation init {kind!r}")


def sign_step(delta: jax.Array, grad: jax.Array, step_size) -> jax.Array:
  return delta + step_size * jnp.sign(grad)


def l2_step(delta: jax.Array, grad: jax.Array, step_size) -> jax.Array:
  """The L2 steepest-ascent step: `step_size` along the per-example normalised gradient (none
  where the gradient is zero)."""
  return delta + step_size * grad / jnp.maximum(_l2_norm(grad), 1e-12)


def to_corner(delta: jax.Array, x: jax.Array, eps) -> jax.Array:
  """Pushes a perturbation to the nearest vertex of the eps-ball (then into [0, 1])."""
  return project(eps * jnp.sign(delta), x, eps)


def fgsm(loss_fn: LossFn, x: jax.Array, eps, step_size, delta0: jax.Array
         ) -> tuple[jax.Array, jax.Array]:
  """One sign step from delta0. Returns (delta, input gradient at x + delta0)."""
  g = input_grad(loss_fn, x + delta0)
  delta = project(sign_step(delta0, g, step_size), x, eps)
  return jax.lax.stop_gradient(delta), g


def pgd(loss_fn: LossFn, x: jax.Array, eps, step_size, steps: int, delta0: jax.Array,
        unroll: bool | int | None = None, norm: str = "Linf") -> jax.Array:
  """`steps` sign steps of `step_size` (L2: normalised-gradient steps), projecting after each
  (all examples, every step).

  `unroll=None` unrolls fully when the program is lowered for a CPU and keeps the loop rolled
  for GPUs and TPUs (xla_cpu.attack_loop_unroll), decided per platform at lowering time, so a
  program exported for `cuda` on a CPU machine carries the rolled loop.
  """

  check_norm(norm)
  step = sign_step if norm == "Linf" else l2_step

  def body(_, delta):
    g = input_grad(loss_fn, x + delta)
    return project(step(delta, g, step_size), x, eps, norm)

  def loop(unroll_):
    return lambda d0: jax.lax.fori_loop(0, steps, body, d0, unroll=unroll_)

  if unroll is None:
    delta = jax.lax.platform_dependent(delta0, cpu=loop(xla_cpu.attack_loop_unroll("cpu")),
                                       default=loop(xla_cpu.attack_loop_unroll("other")))
  else:
    delta = loop(unroll)(delta0)
  return jax.lax.stop_gradient(delta)


RestartCarry = tuple[jax.Array, jax.Array, jax.Array]  # (delta, score, robust)


def restarts_init(x: jax.Array, y: jax.Array, clean: jax.Array) -> RestartCarry:
  """The carry before any restart. `clean` (n,) bool: whether each point is classified correctly
  without attack. Robustness starts there: a point misclassified at x is not robust even if
  every restart's endpoint happens to be classified correctly (on a barely trained model that
  made PGD accuracy exceed clean accuracy)."""
  return (jnp.zeros_like(x), jnp.full(y.shape, -jnp.inf),
          jnp.broadcast_to(jnp.asarray(clean, bool), y.shape))


def clean_correct(logits: jax.Array, y: jax.Array) -> jax.Array:
  """(n,) bool: the unperturbed points the model classifies correctly (restarts_init's `clean`)."""
  return jnp.argmax(logits, -1) == y


def restart_update(carry: RestartCarry, delta: jax.Array, loss: jax.Array, logits: jax.Array,
                   y: jax.Array) -> RestartCarry:
  """Folds one restart into the worst case so far.

  A point stays robust only if it was (restarts_init: correct without attack) and this restart
  does not misclassify it; the kept perturbation is the misclassifying one with the highest loss
  if any restart misclassifies, else the highest-loss.
  """
  best_delta, best_score, robust = carry
  wrong = jnp.argmax(logits, -1) != y
  score = loss + jnp.where(wrong, 1e9, 0.0)  # any misclassification beats any loss
  better = score > best_score
  sel = better.reshape((-1,) + (1,) * (delta.ndim - 1))
  return jnp.where(sel, delta, best_delta), jnp.where(better, score, best_score), robust & ~wrong


def pgd_restart(loss_and_logits_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                carry: RestartCarry, x: jax.Array, y: jax.Array, keys: jax.Array, eps,
                step_size, steps: int, unroll: bool | int | None = None, norm: str = "Linf"
                ) -> RestartCarry:
  """One uniform-start PGD restart in the `norm` ball folded into `carry` (see
  restart_update)."""
  loss_fn = lambda z: loss_and_logits_fn(z)[0]  # noqa: E731
  delta = pgd(loss_fn, x, eps, step_size, steps, init_delta("uniform", keys, x, eps, norm),
              unroll, norm)
  loss, logits = loss_and_logits_fn(x + delta)
  return restart_update(carry, delta, loss, logits, y)


def restart_keys(keys: jax.Array, restart: int) -> jax.Array:
  """Per-example keys of restart number `restart`."""
  return jax.vmap(lambda k: jax.random.fold_in(k, restart))(keys)


def pgd_with_restarts(loss_and_logits_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                      x: jax.Array, y: jax.Array, keys: jax.Array, eps, step_size,
                      steps: int, restarts: int, unroll: bool | int | None = None,
                      clean: jax.Array | None = None, norm: str = "Linf"
                      ) -> tuple[jax.Array, jax.Array]:
  """Worst case over restarts of uniform-start PGD in the `norm` ("Linf" or "L2") ball: the
  evaluation attack (docs/algorithms.md §4.1).

  Returns (robust (n,) bool, delta); a point is robust only if it is classified correctly
  without attack and at every restart's endpoint. `clean` (n,) bool, when the caller already has
  the clean predictions, saves the forward pass at x that decides it otherwise.

  Several restarts run in a rolled loop around one restart's program (its PGD steps unrolled on
  CPU as `pgd` does): unrolling steps x restarts into one program ran out of memory on CPU for
  PGD-50-10 on 200 points of a small CNN. Evaluator loops the restarts from the host instead,
  with identical results (same per-restart keys and clean correctness).
  """
  def one_restart(r, carry):
    return pgd_restart(loss_and_logits_fn, carry, x, y, restart_keys(keys, r), eps, step_size,
                       steps, unroll, norm)

  if clean is None:
    clean = clean_correct(loss_and_logits_fn(x)[1], y)
  carry = restarts_init(x, y, clean)
  if restarts == 1:  # the diagnostics' PGD-10: one program, no loop around it
    carry = one_restart(0, carry)
  else:
    carry = jax.lax.fori_loop(0, restarts, one_restart, carry)
  delta, _, robust = carry
  return robust, jax.lax.stop_gradient(delta)
