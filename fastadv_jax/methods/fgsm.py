"""FGSM (Goodfellow et al.) and its random-start variants (docs/algorithms.md §1).

One sign step of `alpha * eps` from the init (zero, uniform, or a random vertex of the
eps-ball), projected onto the ball and [0, 1]. From the zero init the step's input gradient is
the gradient at the clean point, which GradAlign reuses as its g1.
Difference from the GradAlign authors' code: their `random_corner` trains on the random vertex
itself, with no gradient step; here it is an FGSM step taken from a random vertex.
"""
from __future__ import annotations

import dataclasses

from fastadv_jax import attacks
from fastadv_jax.methods.base import ONE_STEP, AttackInputs, Method, Perturbation, check


@dataclasses.dataclass(frozen=True)
class FGSMArgs:
  """FGSM's step, in multiples of eps: 1.25 is Wong et al.'s FGSM-RS step, which the GradAlign
  paper uses for FGSM from zero too (with a zero start it is clipped back to eps)."""
  alpha: float = 1.25

  def __post_init__(self):
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")


def perturb(inp: AttackInputs) -> Perturbation:
  """One sign step of `alpha * eps` from the start `inp.init`, projected."""
  delta0 = attacks.init_delta(inp.init, inp.keys, inp.x, inp.eps)
  delta, g = attacks.fgsm(inp.loss_fn, inp.x, inp.eps, inp.args.alpha * inp.eps, delta0)
  return Perturbation(delta, g if inp.init == "zero" else None)


METHODS = (
    # GradAlign = FGSM from zero init + the regulariser (the config sets its lambda).
    Method("fgsm", "`eps * sign(g)` from zero, step `alpha * eps` (1.25), projected",
           perturb, FGSMArgs, default_init="zero", presets={"fgsm": {}, "gradalign": {}},
           passes=lambda a: ONE_STEP),
    Method("fgsm_rs", "FGSM from a uniform start (Wong et al. 2020)", perturb, FGSMArgs,
           default_init="uniform", presets={"fgsm_rs": {}}, passes=lambda a: ONE_STEP),
    Method("random_corner", "FGSM from a random vertex of the eps-ball (paper §3)", perturb,
           FGSMArgs, default_init="corner", presets={"random_corner": {}},
           passes=lambda a: ONE_STEP),
)
