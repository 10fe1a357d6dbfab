"""PGD-k training (Madry et al.), the PGD-corner variant of the paper's analysis, and PGD-AT as
the 2026 fast-AT benchmark runs it (attack on the eval-mode model)."""
from __future__ import annotations

import dataclasses

import jax

from fastadv_jax import attacks, losses
from fastadv_jax.methods.base import AttackInputs, Method, Passes, Perturbation, check


@dataclasses.dataclass(frozen=True)
class PGDArgs:
  """PGD-10 with step eps / 5 (the paper's PGD-10; its PGD-2 uses step eps / 2)."""
  steps: int = 10      # sign steps
  alpha: float = 0.2   # step = alpha * eps

  def __post_init__(self):
    check(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")


def _pgd_passes(args: PGDArgs) -> Passes:
  return Passes(input_grad=args.steps, weight_grad=1)


def _pgd_method(name: str, summary: str, to_corner: bool, presets: dict) -> Method:
  def perturb(inp: AttackInputs) -> Perturbation:
    a = inp.args
    delta0 = attacks.init_delta(inp.init, inp.keys, inp.x, inp.eps)
    delta = attacks.pgd(inp.loss_fn, inp.x, inp.eps, a.alpha * inp.eps, a.steps, delta0)
    if to_corner:
      delta = attacks.to_corner(delta, inp.x, inp.eps)
    return Perturbation(delta)

  return Method(name, summary, perturb, PGDArgs, presets=presets, passes=_pgd_passes)


@dataclasses.dataclass(frozen=True)
class PGDATArgs(PGDArgs):
  """The benchmark's PGD-AT: 10 steps of 2/255 at eps 8/255."""
  alpha: float = 0.25  # step = alpha * eps


def _pgd_at_perturb(inp: AttackInputs) -> Perturbation:
  """PGD-AT of the 2026 fast-AT benchmark (fast_at/pgd_at.py, torchattacks' PGD): a uniform
  start in the eps-ball, `steps` sign steps of `alpha * eps`, with BatchNorm in eval mode
  (running statistics, not updated: torchattacks puts the model in eval mode while it attacks)
  and the plain cross-entropy: torchattacks ascends the unsmoothed CE while the benchmark trains
  with label smoothing 0.4, so the attack ignores config.label_smoothing and
  config.label_smoothing_attack. The training CE is the step's (config.label_smoothing). With
  weight averaging (config.ema_decay = 0.9995) this is the benchmark's PGD-AT-WA."""
  if inp.eval_logits_fn is None:
    raise ValueError("pgd_at attacks the eval-mode model: AttackInputs.eval_logits_fn is needed")
  a = inp.args
  loss_fn = lambda z: losses.cross_entropy(inp.eval_logits_fn(z), inp.y)  # noqa: E731
  delta0 = attacks.init_delta(inp.init, inp.keys, inp.x, inp.eps)
  delta = attacks.pgd(loss_fn, inp.x, inp.eps, a.alpha * inp.eps, a.steps, delta0)
  return Perturbation(jax.lax.stop_gradient(delta))


METHODS = (
    _pgd_method("pgd", "`steps` sign steps of `alpha * eps`, projected", False, {
        "pgd2": {"steps": 2, "alpha": 0.5},
        "pgd10": {"steps": 10, "alpha": 0.2}}),
    _pgd_method("pgd_corner", "PGD, then pushed to `eps * sign(delta)` (paper §3)", True,
                {"pgd_corner": {}}),
    Method("pgd_at", "PGD-AT as the benchmark runs it: uniform start, `steps` (10) sign steps of "
           "`alpha * eps` (2/255), plain-CE attack on the eval-mode (running-stats) model",
           _pgd_at_perturb, PGDATArgs, default_init="uniform", presets={"pgd_at": {}},
           passes=_pgd_passes),
)
