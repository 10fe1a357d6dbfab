"""PGD-k training (Madry et al.) and the PGD-corner variant of the paper's analysis."""
from fastadv_jax import attacks
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation


def _pgd_method(name: str, summary: str, to_corner: bool, presets: dict) -> Method:
  def perturb(inp: AttackInputs) -> Perturbation:
    c = inp.config
    delta0 = attacks.init_delta(inp.init, inp.keys, inp.x, inp.eps)
    delta = attacks.pgd(inp.loss_fn, inp.x, inp.eps, c.pgd_alpha * inp.eps, c.pgd_steps, delta0)
    if to_corner:
      delta = attacks.to_corner(delta, inp.x, inp.eps)
    return Perturbation(delta)

  return Method(name, summary, perturb, presets=presets)


METHODS = (
    _pgd_method("pgd", "`pgd_steps` sign steps of `pgd_alpha * eps`, projected", False, {
        "pgd2": {"pgd_steps": 2, "pgd_alpha": 0.5, "attack_init": "zero"},
        "pgd10": {"pgd_steps": 10, "pgd_alpha": 0.2, "attack_init": "zero"}}),
    _pgd_method("pgd_corner", "PGD, then pushed to `eps * sign(delta)` (paper §3)", True,
                {"pgd_corner": {}}),
)
