"""Warnings that an AutoAttack number may not be trustworthy, after the reference's checks.

Each check returns a message (or None); AutoAttack logs them and stores them in its result, so a
suspicious evaluation is flagged in results.json next to the number it casts doubt on. Non-finite
weights or logits are not a warning but an error (NonFiniteOutputError, shared with the PGD
evaluation in evaluation.py): no accuracy computed from them means anything.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class NonFiniteOutputError(FloatingPointError):
  """The model's weights, or its logits on the evaluated points, hold NaN or Inf.

  argmax over NaN logits picks a class all the same, so such a model gets an accuracy (e.g. the
  share of one label) that looks like a number; evaluation stops instead. Defined here, where
  AutoAttack can raise it without importing evaluation.py (which imports this package), and
  re-exported as evaluation.NonFiniteOutputError and autoattack.NonFiniteOutputError.
  """


@jax.jit
def _finite_leaves(tree: Any) -> Any:
  """Per floating-point leaf, whether every entry is finite (one small program per structure;
  the reduction runs where the weights are, and only a flag per leaf comes back)."""
  return jax.tree.map(lambda a: jnp.all(jnp.isfinite(a)) if jnp.issubdtype(a.dtype, jnp.inexact)
                      else jnp.bool_(True), tree)


def check_finite_weights(variables: Any) -> None:
  """NonFiniteOutputError naming the first weight tensor that holds NaN or Inf."""
  leaves = [(p, v) for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]
            if hasattr(v, "dtype")]
  if not leaves:
    return
  flags = jax.device_get(_finite_leaves([v for _, v in leaves]))
  bad = [jax.tree_util.keystr(p) for (p, _), ok in zip(leaves, flags) if not ok]
  if bad:
    raise NonFiniteOutputError(
        f"the model's weights are not finite: {bad[0]} holds NaN or Inf ({len(bad)} tensor(s) in "
        "all); no accuracy can be computed from them")


# How many of a process's first points are also evaluated op by op (eagerly_finite).
EAGER_POINTS = 16


def eagerly_finite(apply_fn: Any, variables: Any, x: np.ndarray) -> np.ndarray:
  """Per point, whether the logits are finite when the model runs op by op (jax.disable_jit),
  with nothing for XLA to fold. Inside a compiled program XLA may fold a NaN away: a model's
  small constants (a closure's numpy weights) are folded at compile time, where max(NaN, 0), a
  ReLU, can come out 0, so a model with a negative BatchNorm variance gives finite logits in
  one program and NaN in another, depending on the jaxlib and the batch shape. Op by op every
  NaN reaches the logits."""
  with jax.disable_jit():
    logits = apply_fn(variables, jnp.asarray(x), jax.random.key(1))
  return np.all(np.isfinite(np.asarray(logits)), -1)


def check_finite_logits(finite: np.ndarray) -> None:
  """NonFiniteOutputError unless the logits of every evaluated point were finite; `finite` (n,)
  bool, one flag per point."""
  finite = np.asarray(finite, bool)
  if not np.all(finite):
    bad = np.flatnonzero(~finite)
    raise NonFiniteOutputError(
        f"the model's logits are NaN or Inf on {bad.size} of {finite.size} evaluated points "
        f"(the first is point {int(bad[0])}), so its accuracies would be meaningless: are the "
        "weights damaged (e.g. a BatchNorm running_var below zero) or too large?")

PGD_GAP = 0.05  # PGD accuracy this far above AutoAttack's suggests the PGD evaluation was weak
SQUARE_RATE = 0.002  # the reference's threshold: Square breaking more than 0.2 % of the points
RANDOM_TOL = 1e-5  # logits differing this much between two model keys: a randomised model
# A point's logits in its batch vs alone, relative to max(1, max |logit|): a batch-independent
# model gives exactly 0 on CPU (the alone pass is the same batched program under vmap; the
# library's CNNs and ResNets, measured), float32 reassociation at most ~1e-6; BatchNorm in
# train mode gave 0.03 to 0.6 per point on the same models.
BATCH_TOL = 1e-3


def point_flags(logits_a: np.ndarray, logits_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per point, what `randomised` and `probabilities` look at: max |logits_a - logits_b| over
  classes (two calls with different model keys), and whether the outputs look like
  probabilities. Per point, so the verdicts on a set of points do not depend on how the points
  were split over chunks or processes."""
  difference = np.max(np.abs(logits_a - logits_b), axis=-1)
  in_unit = np.all((logits_a >= 0) & (logits_a <= 1), axis=-1)
  return difference, in_unit & np.isclose(logits_a.sum(-1), 1.0, atol=1e-4)


def randomised(difference: np.ndarray, version: str) -> str | None:
  """Two calls with different model keys disagree: the defence is randomised. `difference`:
  per point, max |difference| of the logits (point_flags)."""
  diff = float(np.max(difference))
  if diff > RANDOM_TOL and version != "rand":
    return (f"the model's outputs change between calls (max |difference| {diff:.3g}): it is "
            "randomised, so use the rand version (--attack=autoattack-rand; EOT over 20 draws)")
  return None


def batch_gap(logits_batch: np.ndarray, logits_alone: np.ndarray) -> np.ndarray:
  """Per point, max |logits in its batch - logits evaluated alone| over classes, relative to
  max(1, max |logit in its batch|): what `batch_dependent` compares with BATCH_TOL."""
  diff = np.max(np.abs(logits_batch - logits_alone), axis=-1)
  return diff / np.maximum(1.0, np.max(np.abs(logits_batch), axis=-1))


def batch_dependent(gap: np.ndarray, randomised_model: bool) -> str | None:
  """A point's logits change with the batch it is evaluated in (batch_gap per point): then
  every verdict depends on which points share a chunk, and an attack that moves one point moves
  the others' logits too. Not judged for a randomised model, whose draws for a batch and for
  one point differ anyway (RANDOM_TOL)."""
  gap = np.asarray(gap, np.float32)
  flagged = int(np.sum(gap > BATCH_TOL))
  if flagged and not randomised_model:
    return (f"the model's outputs depend on the batch: {flagged} of {gap.size} points get other "
            f"logits alone than in their batch (max relative difference {float(np.max(gap)):.3g})"
            ": BatchNorm in train mode? (or another cross-example interaction) Its robustness "
            "then depends on which points are evaluated together")
  return None


def probabilities(looks_like: np.ndarray) -> str | None:
  """Outputs in [0, 1] that sum to 1 are softmax probabilities, not logits. `looks_like`: per
  point, whether its outputs do (point_flags); the warning needs every point to."""
  if np.all(looks_like):
    return ("the model's outputs look like probabilities (in [0, 1], summing to 1): AutoAttack "
            "needs logits; with probabilities the cross-entropy gradient can vanish")
  return None


def zero_gradients(zero: np.ndarray) -> str | None:
  """Points whose loss has an exactly zero input gradient cannot be attacked by APGD."""
  if np.any(zero):
    return (f"{int(np.sum(zero))} of {zero.size} points have an input gradient of exactly zero: "
            "gradient-based attacks cannot move them (gradient masking?); trust Square's result")
  return None


def square_after_gradients(broken_by_square: int, n: int, gradient_attacks_ran: bool
                           ) -> str | None:
  """Square, which needs no gradient, broke more than 0.2 % of the points after every gradient
  attack had missed them."""
  if gradient_attacks_ran and broken_by_square > SQUARE_RATE * n:
    return (f"Square broke {broken_by_square} points that the gradient-based attacks missed: "
            "the model's gradients may be masked or obfuscated")
  return None


def pgd_gap(pgd_acc: float | None, aa_acc: float) -> str | None:
  if pgd_acc is not None and pgd_acc - aa_acc > PGD_GAP:
    return (f"PGD accuracy {pgd_acc:.4f} is {pgd_acc - aa_acc:.4f} above AutoAttack's "
            f"{aa_acc:.4f}: the PGD evaluation overestimates robustness")
  return None
