"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf: score-based random search.

Uses only the model's outputs, so gradient masking cannot stop it. As in the reference
(fra31/auto-attack): start at vertical stripes of +-eps; then, for up to `n_queries` iterations,
put a square of side s at a random position to a random +-eps colour per channel, and keep it
if the margin loss z_y - max_{i != y} z_i decreased (or the point became misclassified). The
fraction p of pixels a square covers follows the reference's schedule (p_init = 0.8, halved at
iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10 000, rescaled to n_queries).

Unlike the reference, which draws one square position and colour per iteration for the whole
batch, every example draws its own (keyed by its position), so results do not depend on the
batch an example ran in. The loop ends early once every example is broken.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax.autoattack import component
from fastadv_jax.autoattack import losses as aa_losses

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, key) -> logits

_SCHEDULE_ITERS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10 000


def square_fraction(i: jax.Array, n_queries: int, p_init: float = 0.8) -> jax.Array:
  """p at iteration i: p_init halved once per schedule point passed (rescaled to n_queries)."""
  it = jnp.floor(i.astype(jnp.float32) / n_queries * 10000.0)
  halvings = sum((it > t).astype(jnp.float32) for t in _SCHEDULE_ITERS)
  return p_init / jnp.exp2(halvings)


def init(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, keys: jax.Array, eps,
         key: jax.Array) -> dict:
  """Vertical stripes of +-eps (one sign per column and channel), and their margin. `keys`:
  per example; `key`: the model's (for a randomised one)."""
  _, _, w, c = x.shape
  stripes = jax.vmap(lambda k: jnp.sign(jax.random.uniform(k, (1, w, c)) * 2 - 1))(keys)
  x_best = jnp.clip(x + eps * stripes, 0.0, 1.0)
  return dict(x_best=x_best, margin=aa_losses.margin(logits_fn(x_best, key), y),
              queries=jnp.ones((x.shape[0],), jnp.int32))


def body(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, keys: jax.Array, eps, i, s: dict,
         key: jax.Array, n_queries: int = 5000, p_init: float = 0.8) -> dict:
  """Iteration i: one random square per example still classified correctly; kept if it lowers
  the margin. Examples already broken (margin <= 0) are left as they are."""
  _, h, w, c = x.shape
  p = square_fraction(i, n_queries, p_init)
  side = jnp.minimum(jnp.maximum(jnp.round(jnp.sqrt(p * h * w)).astype(jnp.int32), 1), min(h, w))
  u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, i + 1), (2 + c,)))(keys)
  top = jnp.floor(u[:, 0] * (h - side)).astype(jnp.int32)[:, None, None, None]
  left = jnp.floor(u[:, 1] * (w - side)).astype(jnp.int32)[:, None, None, None]
  colour = jnp.sign(u[:, 2:] * 2 - 1)[:, None, None, :]
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]
  inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
  cand = s["x_best"] + jnp.where(inside, 2.0 * eps * colour, 0.0)
  cand = jnp.clip(jnp.clip(cand, x - eps, x + eps), 0.0, 1.0)
  m = aa_losses.margin(logits_fn(cand, key), y)
  active = s["margin"] > 0.0
  take = active & (m < s["margin"])  # the margin is the loss: lower is better, <= 0 is broken
  return dict(x_best=jnp.where(take[:, None, None, None], cand, s["x_best"]),
              margin=jnp.where(take, m, s["margin"]),
              queries=s["queries"] + active.astype(jnp.int32))


def finish(logits_fn: LogitsFn, y: jax.Array, s: dict, key: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
  robust = jnp.argmax(logits_fn(s["x_best"], key), -1) == y
  return jax.lax.stop_gradient(robust), jax.lax.stop_gradient(s["x_best"])


def square(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, keys: jax.Array, eps,
           n_queries: int = 5000, p_init: float = 0.8, model_key: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Square as one jittable function, stopping once every example is broken.

  Returns (robust (n,) bool, x_adv, queries used per example (n,))."""
  key = jax.random.key(0) if model_key is None else model_key

  def cond(carry):
    i, s = carry
    return (i < n_queries) & jnp.any(s["margin"] > 0.0)

  def step(carry):
    i, s = carry
    return i + 1, body(logits_fn, x, y, keys, eps, i, s, key, n_queries, p_init)

  _, s = jax.lax.while_loop(cond, step, (jnp.int32(0), init(logits_fn, x, y, keys, eps, key)))
  robust, x_adv = finish(logits_fn, y, s, key)
  return robust, x_adv, s["queries"]


# --- AutoAttack component -----------------------------------------------------------------------
SQUARE = component.Component(
    name="square",
    init=lambda ctx: init(ctx.logits_fn, ctx.x, ctx.y, ctx.keys, ctx.eps, ctx.model_key),
    body=lambda ctx, i, s: body(ctx.logits_fn, ctx.x, ctx.y, ctx.keys, ctx.eps, i, s,
                                ctx.model_key, ctx.settings.square_queries),
    finish=lambda ctx, s: finish(ctx.logits_fn, ctx.y, s, ctx.model_key),
    iterations=lambda settings: settings.square_queries,
    block=20, targeted=False, gradient_based=False,
    # On the host after each block: stop once no point of the chunk has a positive margin.
    settled=lambda s: ~(np.asarray(s["margin"]) > 0),
    summary="Square, score-based random search")
component.register(SQUARE)
