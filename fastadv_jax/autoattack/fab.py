"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L-inf and L2: FAB-T
(targeted) and FAB (untargeted).

A minimum-norm attack: each iteration linearises a decision boundary at the current point,
projects both the current point and the clean point onto that hyperplane (the smallest step in
the threat model's norm inside [0, 1]^d), and moves to an overshot (eta) convex combination of
the two projections that leans towards the clean point (weight alpha, at most alpha_max). When
the point is misclassified, the closest such point (in the norm) is kept and the iterate is
pulled back towards the clean point by beta. FAB-T linearises the boundary between the label y
and the target t; FAB linearises every class's boundary with y (one input gradient per class)
and takes the one closest in the norm (|f_j - f_y| / dual norm of its gradient). As in the
reference (fra31/auto-attack): 100 iterations, eta 1.05, beta 0.9, alpha_max 0.1, any
misclassification counts; the first restart starts at the clean point, every later one
(`Context.restart` > 0) at x + eps / 2 * t / |t| (t ~ U(-1, 1)^d, L-inf norm; t ~ N(0, I), L2
norm), clipped to [0, 1].

The minimum-norm point is finally projected onto the eps-ball (clipped for L-inf, rescaled
towards x for L2) and checked again: a point counts as broken only if that projection is
misclassified. The reference instead counts a point whose minimal perturbation is larger than
eps as robust; where the minimal perturbation is within eps the two rules agree.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fastadv_jax import randomness
from fastadv_jax.autoattack import component

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, key) -> logits


def _sort_key(v: jax.Array) -> jax.Array:
  """int32 keys ordered as `jnp.sort` orders the float32 `v` (-0 as 0, NaNs last, as one)."""
  v = jnp.where(v == 0, jnp.zeros_like(v), v)
  v = jnp.where(jnp.isnan(v), jnp.full_like(v, jnp.nan), v)
  i = jax.lax.bitcast_convert_type(v, jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)  # negatives: larger magnitude first


def argsort_rows(v: jax.Array) -> jax.Array:
  """`jnp.argsort(v, axis=1)` (stable) for float32 (n, D), by a sort on int32 keys: XLA:CPU
  sorts float keys through JAX's NaN- and zero-aware comparator, about twice as slow as the
  plain integer comparison (FAB's projection is dominated by this sort). Same permutation."""
  iota = jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
  return jax.lax.sort((_sort_key(v), iota), dimension=1, num_keys=1, is_stable=True)[1]


def _piece_root(f_at: jax.Array, below: jax.Array, above: jax.Array, need: jax.Array
                ) -> jax.Array:
  """Where the piecewise-linear f (value `f_at` at the sorted breaks, `below + lam * above` on
  the piece after each) first reaches `need`, per row; inf where it never does (both
  hyperplane projections: the pieces differ, the root does not)."""
  k = jnp.sum(f_at < need, axis=1, keepdims=True)     # first piece reaching `need`
  reachable = k < f_at.shape[1]
  k = jnp.minimum(k, f_at.shape[1] - 1)
  lam = (need - jnp.take_along_axis(below, k, axis=1)) / jnp.maximum(
      jnp.take_along_axis(above, k, axis=1), 1e-30)
  return jnp.where(reachable, jnp.maximum(lam, 0.0), jnp.inf)


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
  order = argsort_rows(room)
  r = jnp.take_along_axis(room, order, axis=1)
  a = jnp.take_along_axis(aw, order, axis=1)
  below = jnp.cumsum(a * r, axis=1) - a * r           # sum_{j<k} a_j r_j
  above = jnp.sum(a, axis=1, keepdims=True) - jnp.cumsum(a, axis=1) + a   # sum_{j>=k} a_j
  f_at_r = below + r * above                          # f(r_k), increasing in k
  lam = _piece_root(f_at_r, below, above, jnp.abs(c)[:, None])
  return direction * jnp.minimum(lam, room)


def project_onto_hyperplane_l2(p: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """For each row: the smallest-L2 d with <w, p + d> = b and p + d in [0, 1]^D.

  p, w: (n, D); b: (n,). By the KKT conditions the minimiser is d_i = clip(lam * s w_i) to the
  box for one lam >= 0 (s the sign of the change needed): coordinate i moves by
  min(lam |w_i|, room_i) towards the face that helps, so <w, .> changes by
  f(lam) = sum_i |w_i| min(lam |w_i|, room_i), piecewise linear and increasing with a break at
  lam_i = room_i / |w_i|. Sort the breaks, find the piece where f reaches |c|, solve for lam
  there (the reference's projection_l2 finds the same piece by bisection). If even lam = inf
  falls short, d is the box corner in that direction, as in the reference.
  """
  c = b - jnp.sum(w * p, axis=1)                      # the change of <w, .> needed
  direction = jnp.sign(c)[:, None] * jnp.sign(w)      # +1 up, -1 down, 0 for w_i = 0
  room = jnp.where(direction > 0, 1.0 - p, p)
  aw = jnp.abs(w)
  moves = aw > 0
  brk = jnp.where(moves, room / jnp.where(moves, aw, 1.0), jnp.inf)   # lam where i hits its face
  order = argsort_rows(brk)
  t = jnp.take_along_axis(brk, order, axis=1)
  a = jnp.take_along_axis(aw, order, axis=1)
  r = jnp.take_along_axis(room, order, axis=1)
  below = jnp.cumsum(a * r, axis=1) - a * r           # sum_{j<k} |w_j| room_j (at their faces)
  above = jnp.sum(a * a, axis=1, keepdims=True) - jnp.cumsum(a * a, axis=1) + a * a  # sum w_j^2
  f_at_t = jnp.where(jnp.isfinite(t), below + t * above, below)   # f(lam_k), increasing in k
  lam = _piece_root(f_at_t, below, above, jnp.abs(c)[:, None])
  return jnp.where(moves, direction * jnp.minimum(lam * aw, room), 0.0)


_PROJECTIONS = {"Linf": project_onto_hyperplane_linf, "L2": project_onto_hyperplane_l2}


def distance(v: jax.Array, norm: str, keepdims: bool = False) -> jax.Array:
  """Per row of (n, D) `v`: its L-inf or L2 norm."""
  if norm == "Linf":
    return jnp.max(jnp.abs(v), axis=1, keepdims=keepdims)
  if norm == "L2":
    return jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=keepdims))
  raise ValueError(f"FAB implements the Linf and L2 threat models, got {norm!r}")


def _flat(v: jax.Array) -> jax.Array:
  return v.reshape(v.shape[0], -1)


def random_start(keys: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
  """The reference's start for restarts after the first: x + eps / 2 * t / |t| in the norm
  (t ~ U(-1, 1)^d for L-inf, N(0, I) for L2; `keys` one per point), clipped to [0, 1]."""
  if norm == "Linf":
    t = randomness.uniform_like(keys, x, -1.0, 1.0)
  else:
    t = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(keys)
  size = distance(_flat(t), norm).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.clip(x + 0.5 * eps * t / jnp.maximum(size, 1e-12), 0.0, 1.0)


def init(x: jax.Array, keys: jax.Array | None = None, eps=None, restart=0, norm: str = "Linf"
         ) -> dict:
  """From the clean point (the reference's first restart, and always without `keys`); from
  `random_start` when `restart` (traced or not) is > 0."""
  x0 = _flat(x)
  x1 = x0
  if keys is not None:
    x1 = jnp.where(jnp.asarray(restart) > 0, _flat(random_start(keys, x, eps, norm)), x0)
  return dict(x1=x1, adv=x0, best=jnp.full((x.shape[0],), jnp.inf))


def _targeted_plane(logits_fn: LogitsFn, x1: jax.Array, shape: tuple, y: jax.Array,
                    target: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(f_t - f_y, its input gradient (n, D)) at x1: the y-vs-target boundary's linearisation."""

  def diff(z):
    logits = logits_fn(z, key)
    pick = lambda c: jnp.take_along_axis(logits, c[:, None], axis=1)[:, 0]  # noqa: E731
    d = pick(target) - pick(y)   # < 0 while y beats the target
    return jnp.sum(d), d

  (_, d), g = jax.value_and_grad(diff, has_aux=True)(x1.reshape(shape))
  return d, _flat(g)


def _closest_plane(logits_fn: LogitsFn, x1: jax.Array, shape: tuple, y: jax.Array,
                   key: jax.Array, norm: str) -> tuple[jax.Array, jax.Array]:
  """(f_j - f_y, its input gradient (n, D)) at x1 for the class j != y whose linearised
  boundary with y is closest in the norm: |f_j - f_y| / ||g_j - g_y||_dual (the dual norm: L1
  for L-inf, L2 for L2). One forward pass and a vjp per class (vmapped), as the reference's
  one backward pass per class."""
  logits, vjp = jax.vjp(lambda z: logits_fn(z, key), x1.reshape(shape))
  n, k = logits.shape
  grads = jax.vmap(lambda e: _flat(vjp(jnp.broadcast_to(e, logits.shape))[0]))(
      jnp.eye(k, dtype=logits.dtype))                               # (K, n, D)
  rows = jnp.arange(n)
  df = logits - logits[rows, y][:, None]                            # (n, K)
  dg = grads - grads[y, rows][None]                                 # (K, n, D)
  dual = jnp.sum(jnp.abs(dg), axis=2) if norm == "Linf" else jnp.sqrt(jnp.sum(dg * dg, axis=2))
  dist = jnp.abs(df) / (1e-12 + dual.T)
  j = jnp.argmin(jnp.where(jax.nn.one_hot(y, k, dtype=bool), jnp.inf, dist), axis=1)
  return df[rows, j], dg[j, rows]


def body(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, target: jax.Array | None, s: dict,
         key: jax.Array, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
         norm: str = "Linf") -> dict:
  """One FAB step: project onto the linearised y-vs-target boundary (target None: the closest
  boundary of any class, untargeted FAB), keep the closest misclassified point, pull
  misclassified iterates back towards x by beta. `key`: the model's (for a randomised one)."""
  x0, x1 = _flat(x), s["x1"]
  if target is None:
    d, g = _closest_plane(logits_fn, x1, x.shape, y, key, norm)
  else:
    d, g = _targeted_plane(logits_fn, x1, x.shape, y, target, key)
  project = _PROJECTIONS[norm]
  b = -d + jnp.sum(g * x1, axis=1)   # the linearised boundary {z : <g, z> = b}
  d1 = project(x1, g, b)
  d2 = project(x0, g, b)
  a1 = jnp.maximum(distance(d1, norm, keepdims=True), 1e-8)
  a2 = jnp.maximum(distance(d2, norm, keepdims=True), 1e-8)
  alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)
  x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
  wrong = jnp.argmax(logits_fn(x1.reshape(x.shape), key), -1) != y
  size = distance(x1 - x0, norm)
  closer = wrong & (size < s["best"])
  return dict(x1=jnp.where(wrong[:, None], x0 + (x1 - x0) * beta, x1),
              adv=jnp.where(closer[:, None], x1, s["adv"]),
              best=jnp.where(closer, size, s["best"]))


def project_onto_ball(z: jax.Array, x0: jax.Array, eps, norm: str) -> jax.Array:
  """Rows of (n, D) `z` moved into the eps-ball around `x0` in the norm: clipped per pixel
  (L-inf), or rescaled towards x0 (L2: the closest point of the ball), then into [0, 1]."""
  if norm == "Linf":
    return jnp.clip(z, x0 - eps, x0 + eps)
  delta = z - x0
  scale = jnp.minimum(1.0, eps / jnp.maximum(distance(delta, norm, keepdims=True), 1e-12))
  return jnp.clip(x0 + delta * scale, 0.0, 1.0)


def finish(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, s: dict, key: jax.Array,
           norm: str = "Linf") -> tuple[jax.Array, jax.Array]:
  """(robust, x_adv): the closest misclassified point, projected onto the eps-ball, if that
  projection is still misclassified."""
  x0 = _flat(x)
  adv = project_onto_ball(s["adv"], x0, eps, norm).reshape(x.shape)
  broken = jnp.isfinite(s["best"]) & (jnp.argmax(logits_fn(adv, key), -1) != y)
  keep = broken.reshape((-1,) + (1,) * (x.ndim - 1))
  return jax.lax.stop_gradient(~broken), jax.lax.stop_gradient(jnp.where(keep, adv, x))


def fab(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, eps, target: jax.Array | None = None,
        steps: int = 100, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
        model_key: jax.Array | None = None, norm: str = "Linf", keys: jax.Array | None = None,
        restart=0) -> tuple[jax.Array, jax.Array]:
  """FAB (target None) or FAB-T towards `target` (n,), one run as one jittable function, from
  the clean point (or, with per-point `keys` and restart > 0, a random start). Returns
  (robust (n,) bool, x_adv)."""
  key = jax.random.key(0) if model_key is None else model_key
  state = jax.lax.fori_loop(0, steps, lambda _, s: body(logits_fn, x, y, target, s, key,
                                                        alpha_max, eta, beta, norm),
                            init(x, keys, eps, restart, norm))
  return finish(logits_fn, x, y, eps, state, key, norm)


def fab_targeted(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, target: jax.Array, eps,
                 steps: int = 100, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, model_key: jax.Array | None = None, norm: str = "Linf"
                 ) -> tuple[jax.Array, jax.Array]:
  """FAB-T towards `target` (n,) as one jittable function. Returns (robust (n,) bool, x_adv)."""
  return fab(logits_fn, x, y, eps, target, steps, alpha_max, eta, beta, model_key, norm)


# --- AutoAttack components ----------------------------------------------------------------------
def _component(name: str, targeted: bool, summary: str) -> component.Component:
  """FAB as a runner component: `settings.fab_steps` iterations in `settings.norm`; restarts
  after the first (ctx.restart > 0) start at random."""
  return component.Component(
      name=name,
      init=lambda ctx: init(ctx.x, ctx.keys, ctx.eps, ctx.restart, ctx.settings.norm),
      body=lambda ctx, i, s: body(ctx.logits_fn, ctx.x, ctx.y, ctx.target if targeted else None,
                                  s, ctx.model_key, norm=ctx.settings.norm),
      finish=lambda ctx, s: finish(ctx.logits_fn, ctx.x, ctx.y, ctx.eps, s, ctx.model_key,
                                   ctx.settings.norm),
      iterations=lambda settings: settings.fab_steps,
      block=10, targeted=targeted, gradient_based=True, summary=summary, norms=("Linf", "L2"))


FAB_T = _component("fab-t", True, "FAB-T, targeted minimum-norm boundary attack")
FAB = _component("fab", False, "FAB, untargeted minimum-norm boundary attack (closest class)")
component.register(FAB_T, FAB)
