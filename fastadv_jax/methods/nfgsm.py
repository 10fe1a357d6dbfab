"""N-FGSM (de Jorge et al., "Make Some Noise", NeurIPS 2022; pdejorge/N-FGSM).

eta ~ U(-k eps, k eps) (k = `noise`, 2), x + eta clipped to [0, 1]; one sign step of
`step * eps` (1.0) from there; then only the [0, 1] box: no projection onto the eps-ball (the
authors' `--clip` defaults to off), so ||delta||_inf can reach (k + 1) eps. Same cost as FGSM.
`clip > 0` projects onto the (clip * eps)-ball, as the authors' option does.
"""
from __future__ import annotations

import dataclasses

import jax

from fastadv_jax import attacks, randomness
from fastadv_jax.methods.base import ONE_STEP, AttackInputs, Method, Perturbation, check


@dataclasses.dataclass(frozen=True)
class NFGSMArgs:
  """The authors' defaults: noise 2 eps, step eps, no eps-ball projection."""
  noise: float = 2.0   # eta ~ U(-noise * eps, noise * eps)
  step: float = 1.0    # step = step * eps
  clip: float = 0.0    # > 0: project onto the (clip * eps)-ball; 0: only the [0, 1] box

  def __post_init__(self):
    check(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")
    check(self.step > 0, "step", f"must be > 0, got {self.step}")
    check(self.clip >= 0, "clip", f"must be >= 0, got {self.clip}")


def perturb(inp: AttackInputs) -> Perturbation:
  a, x = inp.args, inp.x
  k = a.noise * inp.eps
  eta = attacks.clip_to_box(randomness.uniform_like(inp.keys, x, -k, k), x)
  g = attacks.input_grad(inp.loss_fn, x + eta)
  delta = attacks.clip_to_box(attacks.sign_step(eta, g, a.step * inp.eps), x)
  if a.clip > 0:
    delta = attacks.project(delta, x, a.clip * inp.eps)
  return Perturbation(jax.lax.stop_gradient(delta))


METHODS = (Method("nfgsm", "N-FGSM: noise U(-k eps, k eps), k = `noise` (2), one step of "
                  "`step * eps`, no eps-ball projection", perturb, NFGSMArgs,
                  presets={"nfgsm": {}}, passes=lambda a: ONE_STEP),)
