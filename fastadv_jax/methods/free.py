"""Free adversarial training (Shafahi et al. 2019; docs/algorithms.md §1).

Each minibatch is replayed `replay` times; the perturbation is carried from one step to the
next, and its sign step of `alpha * eps` reuses the weight update's own backward pass (the
gradient of the training loss with respect to delta), so an update costs one backward pass.
This follows Shafahi et al.; the GradAlign authors' Free-AT instead takes an FGSM step from the
carried perturbation and then a separate training pass (two backward passes per update).
"""
from __future__ import annotations

import dataclasses

import jax

from fastadv_jax import attacks
from fastadv_jax.methods.base import AttackInputs, Method, Passes, Perturbation, check


@dataclasses.dataclass(frozen=True)
class FreeArgs:
  """Shafahi et al.'s CIFAR-10 setting: m = 8 replays, step eps."""
  replay: int = 8      # minibatch replays m
  alpha: float = 1.0   # step = alpha * eps

  def __post_init__(self):
    check(self.replay >= 1, "replay", f"must be >= 1, got {self.replay}")
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")


def perturb(inp: AttackInputs) -> Perturbation:
  return Perturbation(attacks.project(inp.carried, inp.x, inp.eps))


def next_carried(args: FreeArgs, delta, grad_delta, x, eps):
  new_delta = attacks.project(delta + args.alpha * eps * jax.numpy.sign(grad_delta), x, eps)
  return jax.lax.stop_gradient(new_delta)


METHODS = (Method("free", "Free-AT: each minibatch replayed `replay` times, the "
                  "perturbation carried over, one backward pass for both updates", perturb,
                  FreeArgs, next_carried=next_carried, replays=lambda args: args.replay,
                  presets={"free": {}}, passes=lambda a: Passes(weight_grad=1)),)
