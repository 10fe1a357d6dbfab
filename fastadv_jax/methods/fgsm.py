"""FGSM (Goodfellow et al.) and its random-start variants (SPEC §1).

One sign step of `fgsm_alpha * eps` from the init (zero, uniform, or a random vertex of the
eps-ball), projected onto the ball and [0, 1]. From the zero init the step's input gradient is
the gradient at the clean point, which GradAlign reuses as its g1.
"""
from fastadv_jax import attacks
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation


def perturb(inp: AttackInputs) -> Perturbation:
  """One sign step of `fgsm_alpha * eps` from the start `inp.init`, projected."""
  delta0 = attacks.init_delta(inp.init, inp.keys, inp.x, inp.eps)
  delta, g = attacks.fgsm(inp.loss_fn, inp.x, inp.eps, inp.config.fgsm_alpha * inp.eps, delta0)
  return Perturbation(delta, g if inp.init == "zero" else None)


METHODS = (
    # GradAlign = FGSM from zero init + the regulariser (the config sets its lambda).
    Method("fgsm", "`eps * sign(g)` from zero, step `fgsm_alpha * eps` (1.25), projected",
           perturb, default_init="zero", presets={"fgsm": {}, "gradalign": {}}),
    Method("fgsm_rs", "FGSM from a uniform start (Wong et al. 2020)", perturb,
           default_init="uniform", presets={"fgsm_rs": {}}),
    Method("random_corner", "FGSM from a random vertex of the eps-ball (paper §3)", perturb,
           default_init="corner", presets={"random_corner": {}}),
)
