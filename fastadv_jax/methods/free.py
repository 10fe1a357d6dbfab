"""Free adversarial training (Shafahi et al. 2019; SPEC §1).

Each minibatch is replayed `free_replay` times; the perturbation is carried from one step to the
next, and its sign step of `free_alpha * eps` reuses the weight update's own backward pass (the
gradient of the training loss with respect to delta), so an update costs one backward pass.
"""
import jax

from fastadv_jax import attacks
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation


def perturb(inp: AttackInputs) -> Perturbation:
  return Perturbation(attacks.project(inp.carried, inp.x, inp.eps))


def next_carried(config, delta, grad_delta, x, eps):
  new_delta = attacks.project(delta + config.free_alpha * eps * jax.numpy.sign(grad_delta), x, eps)
  return jax.lax.stop_gradient(new_delta)


METHODS = (Method("free", "Free-AT: each minibatch replayed `free_replay` times, the "
                  "perturbation carried over, one backward pass for both updates", perturb,
                  next_carried=next_carried, replays=lambda c: c.free_replay,
                  presets={"free": {}}),)
