"""What the Evaluator runs on each device: pure functions of the model, its variables and one
device's share of a chunk (x uint8 (b, H, W, C), y (b,), idx (b,) the points' positions in the
evaluated set, which key their randomness). The Evaluator (evaluation.py) pmaps them and owns
the chunks, the devices and the processes."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import attacks, gradalign, losses, randomness
from fastadv_jax.data import augment


def _fns(model: nn.Module, variables: Any) -> tuple[Callable, Callable]:
  """(x -> logits, (x, y) -> (per-example CE, logits)) in eval mode."""
  def logits_fn(x):
    return model.apply(variables, x, train=False)

  def loss_and_logits(x, y):
    logits = logits_fn(x)
    return losses.cross_entropy(logits, y), logits

  return logits_fn, loss_and_logits


def pgd_restart(model: nn.Module, step_alpha: float, norm: str, variables: Any, carry: Any,
                x: jax.Array, y: jax.Array, idx: jax.Array, rng: jax.Array, eps: jax.Array,
                restart: jax.Array, steps: int) -> Any:
  """One restart of PGD-`steps` (attacks.pgd_restart) from the running worst case `carry`."""
  _, loss_and_logits = _fns(model, variables)
  keys = attacks.restart_keys(randomness.example_keys(rng, idx), restart)
  return attacks.pgd_restart(lambda z: loss_and_logits(z, y), carry, augment.to_float(x), y, keys,
                             eps, step_alpha * eps, steps, norm=norm)


def clean_correct(model: nn.Module, variables: Any, x: jax.Array, y: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """(correct, finite): per point, clean correctness and whether all its logits are finite."""
  logits_fn, _ = _fns(model, variables)
  logits = logits_fn(augment.to_float(x))
  return attacks.clean_correct(logits, y), jnp.all(jnp.isfinite(logits), -1)


def diagnostics(model: nn.Module, step_alpha: float, variables: Any, x: jax.Array,
                y: jax.Array, idx: jax.Array, rng: jax.Array, eps: jax.Array, pgd_steps: int
                ) -> dict[str, jax.Array]:
  """Per point: loss, clean / FGSM / PGD correctness, gradient alignment and cos(delta_FGSM,
  delta_PGD) with their masks (diagnostics_summary averages them)."""
  logits_fn, loss_and_logits = _fns(model, variables)
  x = augment.to_float(x)
  keys = randomness.example_keys(rng, idx)
  pgd_keys, noise_keys = randomness.split_keys(keys, 2)
  loss_fn = lambda z: loss_and_logits(z, y)[0]  # noqa: E731
  logits = logits_fn(x)
  clean = attacks.clean_correct(logits, y)
  # FGSM from zero init with step eps: its gradient is also the clean gradient g1.
  d_fgsm, g1 = attacks.fgsm(loss_fn, x, eps, eps, jnp.zeros_like(x))
  robust_pgd, d_pgd = attacks.pgd_with_restarts(lambda z: loss_and_logits(z, y), x, y, pgd_keys,
                                                eps, step_alpha * eps, pgd_steps, 1,
                                                clean=clean)
  _, g2 = gradalign.input_gradients(loss_fn, x, noise_keys, eps, g1=g1)
  cos_g, mask_g = gradalign.masked_cosine(g1, g2)
  cos_d, mask_d = gradalign.masked_cosine(d_fgsm, d_pgd)
  return {
      "loss": losses.cross_entropy(logits, y),
      "clean": clean,
      "fgsm": clean & (jnp.argmax(logits_fn(x + d_fgsm), -1) == y),
      "pgd": robust_pgd,
      "alignment": cos_g, "alignment_mask": mask_g,
      "cos_fgsm_pgd": cos_d, "cos_fgsm_pgd_mask": mask_d,
  }


def diagnostics_summary(out: dict[str, np.ndarray]) -> dict[str, float]:
  """The per-point diagnostics of all points -> the logged averages (masked where masked)."""

  def masked_mean(v, mask):
    return float(np.sum(v * mask) / max(np.sum(mask), 1))

  return {
      "loss": float(np.mean(out["loss"])), "clean_acc": float(np.mean(out["clean"])),
      "fgsm_acc": float(np.mean(out["fgsm"])), "pgd_acc": float(np.mean(out["pgd"])),
      "alignment": masked_mean(out["alignment"], out["alignment_mask"]),
      "cos_fgsm_pgd": masked_mean(out["cos_fgsm_pgd"], out["cos_fgsm_pgd_mask"]),
  }
