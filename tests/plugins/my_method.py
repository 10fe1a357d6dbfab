"""A method defined outside the package (tests/test_functional.py): FGSM from zero whose step
is `alpha * eps` and then scaled down by `shrink` (so a test can recognise its perturbation).

Imported as a plugin (`--config.plugins=my_method` with tests/plugins on PYTHONPATH), it
registers its record, with its own hyperparameters and a preset `my_preset`.
"""
from __future__ import annotations

import dataclasses

import jax

from fastadv_jax import attacks, methods
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation, check


@dataclasses.dataclass(frozen=True)
class ShrunkFGSMArgs:
  alpha: float = 1.0    # FGSM step = alpha * eps
  shrink: float = 0.5   # the projected FGSM perturbation is multiplied by this

  def __post_init__(self):
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
    check(0 < self.shrink <= 1, "shrink", f"must be in (0, 1], got {self.shrink}")


def perturb(inp: AttackInputs) -> Perturbation:
  delta, _ = attacks.fgsm(inp.loss_fn, inp.x, inp.eps, inp.args.alpha * inp.eps,
                          jax.numpy.zeros_like(inp.x))
  return Perturbation(jax.lax.stop_gradient(inp.args.shrink * delta))


RECORD = Method("my_method", "FGSM from zero, scaled by `shrink`", perturb, ShrunkFGSMArgs,
                presets={"my_preset": {"shrink": 0.25}})
methods.register(RECORD)
