"""PGD-k training (Madry et al.) and the PGD-corner variant of the paper's analysis."""
from __future__ import annotations

import dataclasses

from fastadv_jax import attacks
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation, check


@dataclasses.dataclass(frozen=True)
class PGDArgs:
  """PGD-10 with step eps / 5 (the paper's PGD-10; its PGD-2 uses step eps / 2)."""
  steps: int = 10      # sign steps
  alpha: float = 0.2   # step = alpha * eps

  def __post_init__(self):
    check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")


def _pgd_method(name: str, summary: str, to_corner: bool, presets: dict) -> Method:
  def perturb(inp: AttackInputs) -> Perturbation:
    a = inp.args
    delta0 = attacks.init_delta(inp.init, inp.keys, inp.x, inp.eps)
    delta = attacks.pgd(inp.loss_fn, inp.x, inp.eps, a.alpha * inp.eps, a.steps, delta0)
    if to_corner:
      delta = attacks.to_corner(delta, inp.x, inp.eps)
    return Perturbation(delta)

  return Method(name, summary, perturb, PGDArgs, presets=presets)


METHODS = (
    _pgd_method("pgd", "`steps` sign steps of `alpha * eps`, projected", False, {
        "pgd2": {"steps": 2, "alpha": 0.5},
        "pgd10": {"steps": 10, "alpha": 0.2}}),
    _pgd_method("pgd_corner", "PGD, then pushed to `eps * sign(delta)` (paper §3)", True,
                {"pgd_corner": {}}),
)
