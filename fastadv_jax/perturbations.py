"""The training-time inner maximisation chosen by `config.method` (SPEC §1).

Free-AT is not here: its perturbation step shares the weight update's backward pass, so it lives
in train_step.py. Everything else returns a perturbation under stop_gradient and, when it was
computed anyway, the input gradient at the clean point (FGSM from zero init), which GradAlign
reuses as its g1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fastadv_jax import attacks

DEFAULT_INIT = {"fgsm": "zero", "fgsm_rs": "uniform", "random_corner": "corner", "pgd": "zero",
                "pgd_corner": "zero", "free": "zero", "standard": "zero"}


def init_kind(config: ml_collections.ConfigDict) -> str:
  return config.attack_init or DEFAULT_INIT[config.method]


def training_perturbation(config: ml_collections.ConfigDict, loss_fn: attacks.LossFn,
                          x: jax.Array, keys: jax.Array, eps
                          ) -> tuple[jax.Array, jax.Array | None]:
  """Returns (delta, input gradient at the clean point or None)."""
  method = config.method
  if method == "standard":
    return jnp.zeros_like(x), None
  kind = init_kind(config)
  delta0 = attacks.init_delta(kind, keys, x, eps)
  if method in ("fgsm", "fgsm_rs", "random_corner"):
    delta, g = attacks.fgsm(loss_fn, x, eps, config.fgsm_alpha * eps, delta0)
    return delta, (g if kind == "zero" else None)
  if method in ("pgd", "pgd_corner"):
    delta = attacks.pgd(loss_fn, x, eps, config.pgd_alpha * eps, config.pgd_steps, delta0)
    if method == "pgd_corner":
      delta = attacks.to_corner(delta, x, eps)
    return delta, None
  raise ValueError(f"config.method: {method!r} has no training perturbation here")
