"""A plugin AutoAttack component, defined outside the package: one targeted signed-gradient step.

`my-attack` moves every pixel by eps in the sign of the gradient of z_target - z_y (clipped to
[0, 1]), once per target class. For a linear model that step reaches each pixel's end of its
interval in the direction that helps the target most, so it finds the exact worst case: what
tests/test_attack_plugins.py checks. Import it (or name it with `--plugins=my_attack`) to
register it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fastadv_jax import autoattack

__all__ = ["RECORD", "sign_step"]


def sign_step(ctx: autoattack.Context) -> jax.Array:
  """x + eps * sign(d(z_target - z_y)/dx), inside the eps-ball and [0, 1]."""

  def gap(z):
    logits = ctx.logits_fn(z, ctx.model_key)
    pick = lambda c: jnp.take_along_axis(logits, c[:, None], axis=1)[:, 0]  # noqa: E731
    return jnp.sum(pick(ctx.target) - pick(ctx.y))

  g = jax.grad(gap)(ctx.x)
  return jnp.clip(ctx.x + ctx.eps * jnp.sign(g), 0.0, 1.0)


def _finish(ctx: autoattack.Context, x_adv: jax.Array) -> tuple[jax.Array, jax.Array]:
  robust = jnp.argmax(ctx.logits_fn(x_adv, ctx.model_key), -1) == ctx.y
  return robust, x_adv


RECORD = autoattack.Component(
    name="my-attack",
    init=lambda ctx: ctx.x,
    body=lambda ctx, i, state: sign_step(ctx),
    finish=_finish,
    iterations=lambda settings: 1,
    block=1, targeted=True, gradient_based=True,
    summary="one targeted signed-gradient step per target class (test plugin)")
autoattack.register(RECORD)
