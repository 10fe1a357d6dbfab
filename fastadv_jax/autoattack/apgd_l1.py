"""L1-APGD (Croce & Hein, "Mind the box", ICML 2021) as AutoAttack runs it in the L1 threat
model: APGD with a sparse step, the exact projection onto the L1 ball and the [0, 1] box
(l1_ball.py), and the large-radius schedule.

Behaviour of the reference (fra31/auto-attack, `use_largereps`), kept here:
  - three stages at radii 3 eps, 2 eps and eps, of ceil(.3 N), ceil(.3 N) and the rest of the
    N iterations (30, 30, 40 for N = 100); only the last stage's verdict counts;
  - the first stage starts at x + proj(t), t ~ N(0, I)^d, projected onto the 3-eps ball and box;
    each later stage starts from the previous stage's best-loss point projected onto its own
    ball, and starts afresh there (its loss, gradient and verdict evaluated once, step size and
    sparsity reset);
  - the step: the signs of the top `topk` fraction of the gradient's entries by magnitude, over
    their count, times the step size (which starts at the stage's radius); then the projection.
    No momentum;
  - every k = max(int(.04 n), 1) iterations of a stage of n (every iteration for 30 or 40): the
    sparsity of the best point so far, s, sets topk = s / d / 1.5; where s fell below 95 % of
    its value at the last check, the step size goes back to the radius and the iterate to the
    best point (and its gradient); elsewhere the step size shrinks by 1.5, down to radius / 10;
  - the adversarial example kept is the last misclassified iterate of the last stage
    (apgd.finish, as for L-inf).
Every example is its own attack (per-example state and keys, keyed by position), as in apgd.py.
The gradient evaluations are laid out as one sequence, N + 2 after the first (each later stage's
start is one evaluation), so the runner drives them as it drives L-inf APGD's iterations.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import randomness
from fastadv_jax.autoattack import l1_ball

RADII = (3.0, 2.0, 1.0)  # the stages' radii, in units of eps
SHARES = (0.3, 0.3)      # the first stages' shares of the iterations (the last takes the rest)
SPARSITY_DROP = 0.95     # below this ratio of nonzeros since the last check: reset the step
STEP_SHRINK = 1.5        # the step size's division elsewhere; also topk = sparsity / d / 1.5
MIN_STEP = 10.0          # the step size's floor: radius / 10


def stage_lengths(steps: int) -> tuple[int, ...]:
  """Iterations per stage: ceil(.3 N), ceil(.3 N), and the rest (possibly 0 for tiny N)."""
  first = [math.ceil(s * steps) for s in SHARES]
  return tuple(first) + (max(steps - sum(first), 0),)


def evaluations(steps: int) -> int:
  """Gradient evaluations after `init`: every iteration, and each later stage's start."""
  return sum(stage_lengths(steps)) + len(RADII) - 1


def schedule(steps: int) -> dict[str, np.ndarray]:
  """Per evaluation after `init` (static): its stage, whether it starts that stage, and whether
  the sparsity / step-size check runs after it."""
  stage, start, check = [], [], []
  for s, n in enumerate(stage_lengths(steps)):
    if s:
      stage.append(s), start.append(True), check.append(False)
    k = max(int(0.04 * n), 1)
    for j in range(1, n + 1):
      stage.append(s), start.append(False), check.append(j % k == 0)
  return {"stage": np.asarray(stage, np.int32), "start": np.asarray(start, bool),
          "check": np.asarray(check, bool)}


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _fresh(x: jax.Array, y: jax.Array, point: jax.Array, values: tuple, radius) -> dict:
  """The state at a stage's start point, from its (loss, logits, gradient)."""
  loss, logits, grad = values
  sparsity = l1_ball.nonzeros(point - x)
  d = float(np.prod(x.shape[1:]))
  return dict(x_adv=point, grad=grad, x_best=point, grad_best=grad, loss_best=loss,
              step=jnp.full(y.shape, radius, jnp.float32), topk=sparsity / d / STEP_SHRINK,
              sparsity=sparsity, robust=jnp.argmax(logits, -1) == y, x_best_adv=point)


def init(grad_fn: Callable, x: jax.Array, y: jax.Array, keys: jax.Array, eps, steps: int
         ) -> dict:
  """The first stage's start: a Gaussian draw projected onto the 3-eps ball and the box."""
  radius = RADII[0] * eps
  point = x + l1_ball.project(x, randomness.normal_like(keys, x), radius)
  return _fresh(x, y, point, grad_fn(point, evaluations(steps)), radius)


def body(grad_fn: Callable, x: jax.Array, y: jax.Array, eps, i, s: dict, steps: int) -> dict:
  """Evaluation i after init: a later stage's start, or a sparse step and the bookkeeping."""
  plan = {k: jnp.asarray(v)[i] for k, v in schedule(steps).items()}
  radius = jnp.asarray(RADII, jnp.float32)[plan["stage"]] * eps
  stepped = s["x_adv"] + _bcast(s["step"], x) * l1_ball.sparse_direction(s["grad"], s["topk"])
  # a stage's start: the best point so far, projected onto the smaller ball
  point = x + l1_ball.project(x, jnp.where(plan["start"], s["x_best"], stepped) - x, radius)
  values = grad_fn(point, i)
  loss, logits, grad = values
  wrong = jnp.argmax(logits, -1) != y
  better = loss > s["loss_best"]
  on = s | dict(x_adv=point, grad=grad, robust=s["robust"] & ~wrong,
                x_best_adv=jnp.where(_bcast(wrong, x), point, s["x_best_adv"]),
                x_best=jnp.where(_bcast(better, x), point, s["x_best"]),
                grad_best=jnp.where(_bcast(better, x), grad, s["grad_best"]),
                loss_best=jnp.where(better, loss, s["loss_best"]))
  on = _check(on, x, radius, plan["check"])
  fresh = _fresh(x, y, point, values, radius)
  return jax.tree.map(lambda a, b: jnp.where(plan["start"], a, b), fresh, on)


def _check(s: dict, x: jax.Array, radius, active) -> dict:
  """The sparsity / step-size rule (a no-op unless `active`)."""
  sparsity = l1_ball.nonzeros(s["x_best"] - x)
  d = float(np.prod(x.shape[1:]))
  back = active & (sparsity / s["sparsity"] < SPARSITY_DROP)  # 0 / 0 is NaN: not back
  step = jnp.clip(jnp.where(back, radius, s["step"] / STEP_SHRINK), radius / MIN_STEP, radius)
  hb = _bcast(back, x)
  return s | dict(
      step=jnp.where(active, step, s["step"]),
      topk=jnp.where(active, sparsity / d / STEP_SHRINK, s["topk"]),
      sparsity=jnp.where(active, sparsity, s["sparsity"]),
      x_adv=jnp.where(hb, s["x_best"], s["x_adv"]), grad=jnp.where(hb, s["grad_best"], s["grad"]))
