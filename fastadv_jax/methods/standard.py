"""Plain training: no perturbation."""
import jax.numpy as jnp

from fastadv_jax.methods.base import AttackInputs, Method, Passes, Perturbation


def perturb(inp: AttackInputs) -> Perturbation:
  return Perturbation(jnp.zeros_like(inp.x))


METHODS = (Method("standard", "no perturbation (plain training)", perturb,
                  presets={"standard": {}}, passes=lambda a: Passes(weight_grad=1)),)
