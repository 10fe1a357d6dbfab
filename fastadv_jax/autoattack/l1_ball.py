"""The geometry of the L1 threat model: the exact projection onto the L1 ball intersected with
the [0, 1] box, and the sparse steepest-ascent direction of L1-APGD (Croce & Hein, "Mind the box:
l1-APGD for sparse adversarial attacks on image classifiers", ICML 2021).

Why the box matters: projecting onto the L1 ball and then clipping to [0, 1] gives a point in
both sets but not the closest one, and it wastes budget on coordinates that the box clips
anyway; at the pixel boundaries, where sparse attacks put their mass, the difference is large.
The exact projection of a perturbation `d` (per example) is

    p_i = sign(d_i) * clip(|d_i| - lam, 0, m_i),  m_i = min(|d_i|, room_i),

where room_i is how far x_i can move in the direction of d_i inside [0, 1], and lam >= 0 is the
smallest threshold with sum_i |p_i| <= eps (lam = 0 when clipping to the box already fits).
The sum is non-increasing in lam, so lam is found by halving over the bit patterns of float32
(non-negative floats are ordered as their bits): 31 halvings give the smallest float32 that fits,
exactly, with elementwise work only. The sparse direction's threshold (the k-th largest gradient
entry) is found the same way, by counting, instead of sorting each gradient: under AutoAttack's
unrolled blocks a sort per iteration made each block's program take about 10 s to compile on
XLA:CPU.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _flat(v: jax.Array) -> jax.Array:
  return v.reshape(v.shape[0], -1)


def nonzeros(v: jax.Array) -> jax.Array:
  """Per-example count of nonzero entries (the L0 "norm"), float32 of shape (n,)."""
  return jnp.sum(_flat(v) != 0, axis=1).astype(jnp.float32)


def _bits(v: jax.Array) -> jax.Array:
  """The int32 bit patterns of non-negative float32 values: ordered as the values are."""
  return jax.lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)


def _float(b: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _search(fits: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Per row, the boundary between lo (fits(lo) False) and hi (fits(hi) True) over int32 bit
  patterns of non-negative floats, for a `fits` monotone in them: the smallest pattern that
  fits. 31 halvings cover every pattern, so the answer is exact; the loop stays rolled (it is
  elementwise work, cheap to compile, unlike a sort per step unrolled by the runner)."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = fits(mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  return jax.lax.fori_loop(0, 31, halve, (lo, hi))[1]


def _threshold(a: jax.Array, m: jax.Array, eps: jax.Array) -> jax.Array:
  """Per row, the smallest float32 lam >= 0 with sum(clip(a - lam, 0, m)) <= eps (a >= m >= 0):
  the sum is non-increasing in lam, so a search over lam's bit patterns finds it exactly."""
  size = lambda lam: jnp.sum(jnp.clip(a - lam[:, None], 0.0, m), axis=1)  # noqa: E731
  fits = lambda b: size(_float(b)) <= eps  # noqa: E731
  zero = jnp.zeros(eps.shape, jnp.int32)
  lam = _float(_search(fits, zero, _bits(jnp.max(a, axis=1))))
  return jnp.where(size(jnp.zeros_like(eps)) <= eps, 0.0, lam)


def project(x: jax.Array, delta: jax.Array, eps) -> jax.Array:
  """The perturbation closest to `delta` (Euclidean, per example) with L1 norm at most eps and
  x + result in [0, 1]. `x` must lie in [0, 1]; eps is a scalar or one radius per example.

  Computed in float32, the threshold can leave the sum a few ulps above eps; the result is then
  scaled down (towards 0, so it stays in the box) until float32 sums it to at most eps. The
  exact norm of the float32 result is within float32 rounding of a sum of eps (relative
  2^-20 on CIFAR-10's 3072 entries, tested)."""
  n = x.shape[0]
  xf, d = _flat(x).astype(jnp.float32), _flat(delta).astype(jnp.float32)
  a = jnp.abs(d)
  room = jnp.where(d > 0, 1.0 - xf, xf)
  m = jnp.minimum(a, jnp.maximum(room, 0.0))
  eps = jnp.broadcast_to(jnp.asarray(eps, jnp.float32), (n,))
  lam = _threshold(a, m, eps)
  p = jnp.sign(d) * jnp.clip(a - lam[:, None], 0.0, m)
  size = jnp.sum(jnp.abs(p), axis=1)
  p = p * jnp.where(size > eps, eps / jnp.maximum(size, 1e-30) * (1.0 - 2.0**-22), 1.0)[:, None]
  return p.reshape(delta.shape)


def sparse_direction(grad: jax.Array, topk: jax.Array) -> jax.Array:
  """L1-APGD's step direction: the signs of the gradient's largest entries by magnitude (the
  top fraction `topk` per example, ties included), each divided by how many were kept, so the
  direction has L1 norm 1 (0 where the gradient is 0).

  As l1-APGD: with the magnitudes sorted ascending, the threshold is the one at position
  int((1 - topk) * d) (float32, truncated, clipped to [0, d - 1]), found here by counting: the
  largest value v with at least d - position magnitudes >= v."""
  g = _flat(grad).astype(jnp.float32)
  d = g.shape[1]
  bits = _bits(jnp.abs(g))
  at = jnp.clip(((1.0 - topk) * d).astype(jnp.int32), 0, d - 1)
  want = d - at  # magnitudes at or above the threshold, at least
  short = lambda b: jnp.sum(bits >= b[:, None], axis=1) < want  # noqa: E731  (b too high)
  threshold = _search(short, jnp.zeros_like(at), jnp.max(bits, axis=1) + 1) - 1
  signs = jnp.sign(jnp.where(bits >= threshold[:, None], g, 0.0))
  kept = jnp.sum(jnp.abs(signs), axis=1, keepdims=True)
  return (signs / (kept + 1e-10)).reshape(grad.shape).astype(grad.dtype)
