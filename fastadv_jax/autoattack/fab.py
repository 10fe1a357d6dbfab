"""FAB-T, the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L-inf.

A minimum-norm attack: each iteration linearises the decision boundary between the label y and
the target t at the current point, projects both the current point and the clean point onto
that hyperplane (smallest L-inf step inside [0, 1]^d), and moves to an overshot (eta) convex
combination of the two projections that leans towards the clean point (weight alpha, at most
alpha_max). When the point is misclassified, the closest such point is kept and the iterate is
pulled back towards the clean point by beta. As in the reference (fra31/auto-attack): 100
iterations from the clean point (no random start in the first restart), eta 1.05, beta 0.9,
alpha_max 0.1, any misclassification counts.

For the L-inf threat model the minimum-norm point is finally projected onto the eps-ball and
checked again: a point counts as broken only if that projection is misclassified. The
reference instead counts a point whose minimal perturbation is larger than eps as robust;
where the minimal perturbation is within eps the two rules agree.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fastadv_jax.autoattack import component

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, key) -> logits


def project_onto_hyperplane_linf(p: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """For each row: the smallest-L-inf d with <w, p + d> = b and p + d in [0, 1]^D.

  p, w: (n, D); b: (n,). Moving coordinate i by m_i >= 0 in the direction that brings <w, .>
  towards b changes it by |w_i| m_i, and coordinate i can move at most room_i (to the box
  face). At radius lam the largest change is f(lam) = sum_i |w_i| min(lam, room_i), a
  piecewise-linear increasing function: sort the rooms, find the piece where f reaches |c|,
  solve for lam there. If even lam = inf falls short, d is the box corner in that direction
  (the closest the box allows), as in the reference.
  """
  c = b - jnp.sum(w * p, axis=1)                      # the change of <w, .> needed
  direction = jnp.sign(c)[:, None] * jnp.sign(w)      # +1 up, -1 down, 0 for w_i = 0
  room = jnp.where(direction > 0, 1.0 - p, p)
  aw = jnp.abs(w)
  order = jnp.argsort(room, axis=1)
  r = jnp.take_along_axis(room, order, axis=1)
  a = jnp.take_along_axis(aw, order, axis=1)
  below = jnp.cumsum(a * r, axis=1) - a * r           # sum_{j<k} a_j r_j
  above = jnp.sum(a, axis=1, keepdims=True) - jnp.cumsum(a, axis=1) + a   # sum_{j>=k} a_j
  f_at_r = below + r * above                          # f(r_k), increasing in k
  need = jnp.abs(c)[:, None]
  k = jnp.sum(f_at_r < need, axis=1, keepdims=True)   # first piece reaching `need`
  reachable = k < p.shape[1]
  k = jnp.minimum(k, p.shape[1] - 1)
  lam = (need - jnp.take_along_axis(below, k, axis=1)) / jnp.maximum(
      jnp.take_along_axis(above, k, axis=1), 1e-30)
  lam = jnp.where(reachable, jnp.maximum(lam, 0.0), jnp.inf)
  return direction * jnp.minimum(lam, room)


def _flat(v: jax.Array) -> jax.Array:
  return v.reshape(v.shape[0], -1)


def init(x: jax.Array) -> dict:
  """From the clean point (the reference's first restart has no random start)."""
  x0 = _flat(x)
  return dict(x1=x0, adv=x0, best=jnp.full((x.shape[0],), jnp.inf))


def body(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, target: jax.Array, s: dict,
         key: jax.Array, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9) -> dict:
  """One FAB step: project onto the linearised y-vs-target boundary, keep the closest
  misclassified point, pull misclassified iterates back towards x by beta. `key`: the model's
  (for a randomised one)."""
  x0, x1 = _flat(x), s["x1"]

  def diff(z):
    logits = logits_fn(z, key)
    pick = lambda c: jnp.take_along_axis(logits, c[:, None], axis=1)[:, 0]  # noqa: E731
    d = pick(target) - pick(y)   # < 0 while y beats the target
    return jnp.sum(d), d

  (_, d), g = jax.value_and_grad(diff, has_aux=True)(x1.reshape(x.shape))
  g = _flat(g)
  b = -d + jnp.sum(g * x1, axis=1)   # the linearised boundary {z : <g, z> = b}
  d1 = project_onto_hyperplane_linf(x1, g, b)
  d2 = project_onto_hyperplane_linf(x0, g, b)
  a1 = jnp.maximum(jnp.max(jnp.abs(d1), axis=1, keepdims=True), 1e-8)
  a2 = jnp.maximum(jnp.max(jnp.abs(d2), axis=1, keepdims=True), 1e-8)
  alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)
  x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
  wrong = jnp.argmax(logits_fn(x1.reshape(x.shape), key), -1) != y
  norm = jnp.max(jnp.abs(x1 - x0), axis=1)
  closer = wrong & (norm < s["best"])
  return dict(x1=jnp.where(wrong[:, None], x0 + (x1 - x0) * beta, x1),
              adv=jnp.where(closer[:, None], x1, s["adv"]),
              best=jnp.where(closer, norm, s["best"]))


def finish(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, s: dict, key: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
  """(robust, x_adv): the closest misclassified point, projected onto the eps-ball, if that
  projection is still misclassified."""
  x0 = _flat(x)
  adv = jnp.clip(s["adv"], x0 - eps, x0 + eps).reshape(x.shape)
  broken = jnp.isfinite(s["best"]) & (jnp.argmax(logits_fn(adv, key), -1) != y)
  keep = broken.reshape((-1,) + (1,) * (x.ndim - 1))
  return jax.lax.stop_gradient(~broken), jax.lax.stop_gradient(jnp.where(keep, adv, x))


def fab_targeted(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, target: jax.Array, eps,
                 steps: int = 100, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, model_key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """FAB-T towards `target` (n,) as one jittable function. Returns (robust (n,) bool, x_adv)."""
  key = jax.random.key(0) if model_key is None else model_key
  state = jax.lax.fori_loop(0, steps, lambda _, s: body(logits_fn, x, y, target, s, key,
                                                        alpha_max, eta, beta), init(x))
  return finish(logits_fn, x, y, eps, state, key)


# --- AutoAttack component -----------------------------------------------------------------------
FAB_T = component.Component(
    name="fab-t",
    init=lambda ctx: init(ctx.x),
    body=lambda ctx, i, s: body(ctx.logits_fn, ctx.x, ctx.y, ctx.target, s, ctx.model_key),
    finish=lambda ctx, s: finish(ctx.logits_fn, ctx.x, ctx.y, ctx.eps, s, ctx.model_key),
    iterations=lambda settings: settings.fab_steps,
    block=10, targeted=True, gradient_based=True,
    summary="FAB-T, targeted minimum-norm boundary attack")
component.register(FAB_T)
