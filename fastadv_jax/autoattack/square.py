"""Square Attack (Andriushchenko et al., ECCV 2020), L-inf and L2: score-based random search.

Uses only the model's outputs, so gradient masking cannot stop it. As in the reference
(fra31/auto-attack): start at vertical stripes of +-eps; then, for up to `n_queries` iterations,
put a square of side s at a random position to a random +-eps colour per channel, and keep it
if the margin loss z_y - max_{i != y} z_i decreased (or the point became misclassified). The
fraction p of pixels a square covers follows the reference's schedule (p_init = 0.8, halved at
iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10 000, rescaled to n_queries).

L2 (the reference's version): the start is a 5 x 5 grid of tiles of side h // 5, each a
"meta-pseudo-gaussian" pattern eta (two stacked halves of opposite sign, each a sum of nested
rectangles weighted 1 / (k + 1)^2; transposed at random) with a random sign per channel, scaled
to norm eps. An iteration takes two windows of side s (s = round(sqrt(p h w)), at least 3, made
odd): it empties the second, and into the first puts a fresh signed eta plus the window's own
normalised content, rescaled per channel so the whole perturbation keeps its budget (the
window's old mass plus, spread over the channels, what is left of eps); the result is rescaled
to norm eps and clipped to [0, 1].

Unlike the reference, which draws one square position and colour per iteration for the whole
batch, every example draws its own (keyed by its position), so results do not depend on the
batch an example ran in; the same holds for the L2 windows, signs and transpositions. The loop
ends early once every example is broken.
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
           n_queries: int = 5000, p_init: float = 0.8, model_key: jax.Array | None = None,
           norm: str = "Linf") -> tuple[jax.Array, jax.Array, jax.Array]:
  """Square in the `norm` ("Linf" or "L2") ball as one jittable function, stopping once every
  example is broken.

  Returns (robust (n,) bool, x_adv, queries used per example (n,))."""
  if norm not in component.NORMS:
    raise ValueError(f"Square: norm must be one of {', '.join(component.NORMS)}, got {norm!r}")
  key = jax.random.key(0) if model_key is None else model_key
  start, body_ = (init, body) if norm == "Linf" else (init_l2, body_l2)

  def cond(carry):
    i, s = carry
    return (i < n_queries) & jnp.any(s["margin"] > 0.0)

  def step(carry):
    i, s = carry
    return i + 1, body_(logits_fn, x, y, keys, eps, i, s, key, n_queries, p_init)

  _, s = jax.lax.while_loop(cond, step, (jnp.int32(0), start(logits_fn, x, y, keys, eps, key)))
  robust, x_adv = finish(logits_fn, y, s, key)
  return robust, x_adv, s["queries"]


# --- L2 -----------------------------------------------------------------------------------------
def _eta_rectangles(rows: int, cols: int) -> np.ndarray:
  """Nested rectangles around the centre, the k-th (from 0) weighted 1 / (k + 1)^2; unit norm."""
  d = np.zeros((rows, cols), np.float64)
  r, c = rows // 2, cols // 2  # the top-left corner of the innermost rectangle
  for k in range(max(rows // 2 + 1, cols // 2 + 1)):
    d[max(r, 0):min(r + 2 * k + 1, rows), max(c, 0):min(c + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
    r, c = r - 1, c - 1
  norm = np.sqrt(np.sum(d ** 2))
  return d / norm if norm > 0 else d


def eta(side: int) -> np.ndarray:
  """The reference's meta-pseudo-gaussian square (side x side, unit L2 norm): the top half
  positive, the bottom half negative, each a stack of nested rectangles."""
  d = np.concatenate([_eta_rectangles(side // 2, side), -_eta_rectangles(side - side // 2, side)])
  return (d / np.sqrt(np.sum(d ** 2))).astype(np.float32)


def l2_sides(h: int, w: int, p_init: float = 0.8) -> np.ndarray:
  """The window side after k halvings of p (k = 0 .. 9): round(sqrt(p h w)), at least 3, made
  odd, as the reference; capped by the image (where the reference would fail)."""
  sides = []
  for k in range(len(_SCHEDULE_ITERS) + 1):
    side = max(int(round(np.sqrt(p_init / 2 ** k * h * w))), 3)
    sides.append(min(side + 1 if side % 2 == 0 else side, h, w))
  return np.asarray(sides, np.int32)


def _halvings(i: jax.Array, n_queries: int) -> jax.Array:
  it = jnp.floor(i.astype(jnp.float32) / n_queries * 10000.0)
  return sum((it > t).astype(jnp.int32) for t in _SCHEDULE_ITERS)


def _norm(v: jax.Array, axes=(1, 2, 3)) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def _init_tiles(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """The reference's starting grid: tiles of side h // 5 from (h - 5 side) // 2 on, eta and its
  transpose placed in each (cut at the image's edge), (tiles, h, w) each."""
  side = max(h // 5, 1)
  start = (h - 5 * side) // 2
  e = eta(side)
  placed, transposed = [], []
  for a in range(h // side):
    for b in range(w // side):
      r, c = start + a * side, start + b * side
      if r >= h or c >= w:
        continue
      for pattern, out in ((e, placed), (e.T, transposed)):
        t = np.zeros((h, w), np.float32)
        t[r:r + side, c:c + side] = pattern[:h - r, :w - c]
        out.append(t)
  return np.stack(placed), np.stack(transposed)


def init_l2(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, keys: jax.Array, eps,
            key: jax.Array) -> dict:
  """The reference's L2 start: a grid of signed eta tiles (one sign per tile and channel, a
  random transposition per tile), scaled to norm eps, clipped to [0, 1]; and its margin."""
  _, h, w, c = x.shape
  placed, transposed = (jnp.asarray(t) for t in _init_tiles(h, w))
  u = jax.vmap(lambda k: jax.random.uniform(k, (placed.shape[0], 1 + c)))(keys)
  flip = (u[:, :, :1] > 0.5).astype(x.dtype)
  sign = jnp.sign(u[:, :, 1:] * 2 - 1)
  delta = (jnp.einsum("ntc,thw->nhwc", sign * (1 - flip), placed)
           + jnp.einsum("ntc,thw->nhwc", sign * flip, transposed))
  x_best = jnp.clip(x + delta / (_norm(delta) + 1e-12) * eps, 0.0, 1.0)
  return dict(x_best=x_best, margin=aa_losses.margin(logits_fn(x_best, key), y),
              queries=jnp.ones((x.shape[0],), jnp.int32))


def body_l2(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, keys: jax.Array, eps, i, s: dict,
            key: jax.Array, n_queries: int = 5000, p_init: float = 0.8) -> dict:
  """Iteration i of the L2 version (module docstring) for every example still classified
  correctly; the candidate is kept if it lowers the margin."""
  _, h, w, c = x.shape
  sides = l2_sides(h, w, p_init)
  s_max = int(sides.max())
  table = np.zeros((len(sides), s_max, s_max), np.float32)
  for k, side in enumerate(sides):
    table[k, :side, :side] = eta(int(side))
  k = _halvings(i, n_queries)
  side = jnp.asarray(sides)[k]
  pattern = jnp.asarray(table)[k]
  u = jax.vmap(lambda kk: jax.random.uniform(jax.random.fold_in(kk, i + 1), (5 + c,)))(keys)
  corner = jnp.floor(u[:, :4] * (jnp.array([h, w, h, w]) - side)).astype(jnp.int32)
  transpose = u[:, 4] > 0.5
  colour = jnp.sign(u[:, 5:] * 2 - 1)[:, None, None, :]
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]

  def window(top, left):  # local coordinates and the (n, h, w, 1) mask of a side x side window
    lr, lc = rows - top[:, None, None], cols - left[:, None, None]
    inside = (lr >= 0) & (lr < side) & (lc >= 0) & (lc < side)
    return jnp.clip(lr, 0, s_max - 1), jnp.clip(lc, 0, s_max - 1), inside[..., None]

  lr, lc, in1 = window(corner[:, 0], corner[:, 1])
  _, _, in2 = window(corner[:, 2], corner[:, 3])
  t = transpose[:, None, None]
  fresh = jnp.where(in1, pattern[jnp.where(t, lc, lr), jnp.where(t, lr, lc)][..., None], 0.0)
  delta = s["x_best"] - x
  old = jnp.where(in1, delta, 0.0)
  budget = jnp.sqrt(jnp.maximum(eps ** 2 - _norm(delta) ** 2, 0.0) / c
                    + _norm(jnp.where(in1 | in2, delta, 0.0)) ** 2)
  new = fresh * colour + old / (1e-12 + _norm(old, (1, 2)))
  new = new / (1e-12 + _norm(new, (1, 2))) * budget
  delta = jnp.where(in1, new, jnp.where(in2, 0.0, delta))
  cand = jnp.clip(x + delta / (_norm(delta) + 1e-12) * eps, 0.0, 1.0)
  m = aa_losses.margin(logits_fn(cand, key), y)
  active = s["margin"] > 0.0
  take = active & (m < s["margin"])
  return dict(x_best=jnp.where(take[:, None, None, None], cand, s["x_best"]),
              margin=jnp.where(take, m, s["margin"]),
              queries=s["queries"] + active.astype(jnp.int32))


# --- AutoAttack component -----------------------------------------------------------------------
def _init(ctx: component.Context) -> dict:
  start = init if ctx.settings.norm == "Linf" else init_l2
  return start(ctx.logits_fn, ctx.x, ctx.y, ctx.keys, ctx.eps, ctx.model_key)


def _body(ctx: component.Context, i, s: dict) -> dict:
  step = body if ctx.settings.norm == "Linf" else body_l2
  return step(ctx.logits_fn, ctx.x, ctx.y, ctx.keys, ctx.eps, i, s, ctx.model_key,
              ctx.settings.square_queries)


SQUARE = component.Component(
    name="square", init=_init, body=_body,
    finish=lambda ctx, s: finish(ctx.logits_fn, ctx.y, s, ctx.model_key),
    iterations=lambda settings: settings.square_queries,
    block=20, targeted=False, gradient_based=False,
    # On the host after each block: stop once no point of the chunk has a positive margin.
    settled=lambda s: ~(np.asarray(s["margin"]) > 0),
    summary="Square, score-based random search", norms=("Linf", "L2"))
component.register(SQUARE)
