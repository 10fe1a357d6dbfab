"""N-FGSM (de Jorge et al., "Make Some Noise", NeurIPS 2022; pdejorge/N-FGSM).

eta ~ U(-k eps, k eps) (k = `nfgsm_noise`, 2), x + eta clipped to [0, 1]; one sign step of
`nfgsm_step * eps` (1.0) from there; then only the [0, 1] box: no projection onto the eps-ball
(the authors' `--clip` defaults to off), so ||delta||_inf can reach (k + 1) eps. Same cost as
FGSM. `nfgsm_clip > 0` projects onto the (nfgsm_clip * eps)-ball, as the authors' option does.
"""
import jax

from fastadv_jax import attacks, randomness
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation


def perturb(inp: AttackInputs) -> Perturbation:
  c, x = inp.config, inp.x
  k = c.nfgsm_noise * inp.eps
  eta = attacks.clip_to_box(randomness.uniform_like(inp.keys, x, -k, k), x)
  g = attacks.input_grad(inp.loss_fn, x + eta)
  delta = attacks.clip_to_box(attacks.sign_step(eta, g, c.nfgsm_step * inp.eps), x)
  if c.nfgsm_clip > 0:
    delta = attacks.project(delta, x, c.nfgsm_clip * inp.eps)
  return Perturbation(jax.lax.stop_gradient(delta))


METHODS = (Method("nfgsm", "N-FGSM: noise U(-k eps, k eps), k = `nfgsm_noise` (2), one step of "
                  "`nfgsm_step * eps`, no eps-ball projection", perturb,
                  presets={"nfgsm": {}}),)
