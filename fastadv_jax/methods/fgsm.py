"""FGSM (Goodfellow et al.) and its random-start variants (SPEC §1).

One sign step of `fgsm_alpha * eps` from the init (zero, uniform, or a random vertex of the
eps-ball), projected onto the ball and [0, 1]. From the zero init the step's input gradient is
the gradient at the clean point, which GradAlign reuses as its g1.
"""
from fastadv_jax import attacks
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation


def _fgsm_method(name: str, summary: str, default_init: str, presets: dict) -> Method:
  def perturb(inp: AttackInputs) -> Perturbation:
    kind = inp.config.attack_init or default_init
    delta0 = attacks.init_delta(kind, inp.keys, inp.x, inp.eps)
    delta, g = attacks.fgsm(inp.loss_fn, inp.x, inp.eps, inp.config.fgsm_alpha * inp.eps, delta0)
    return Perturbation(delta, g if kind == "zero" else None)

  return Method(name, summary, perturb, default_init=default_init, presets=presets)


METHODS = (
    # GradAlign = FGSM from zero init + the regulariser (the config sets its lambda).
    _fgsm_method("fgsm", "`eps * sign(g)` from zero, step `fgsm_alpha * eps` (1.25), projected",
                 "zero", {"fgsm": {}, "gradalign": {}}),
    _fgsm_method("fgsm_rs", "FGSM from a uniform start (Wong et al. 2020)", "uniform",
                 {"fgsm_rs": {}}),
    _fgsm_method("random_corner", "FGSM from a random vertex of the eps-ball (paper §3)",
                 "corner", {"random_corner": {}}),
)
