"""Which of several evaluations of a randomised model counts (after fra31/auto-attack PR #105 by
Buntender and LYMDLUT, and Liu et al. 2024, "Towards Better Adversarial Purification via ...",
Appendix L).

The reference evaluates a randomised model once per candidate: one draw decides whether a point
goes on to the next attack and which adversarial example is final. A point misclassified by a
lucky draw leaves the attack early with a weak example (or, at the clean pass, unattacked), so the
final examples are less adversarial than the attack could make them and their robustness, measured
over fresh draws, is inflated. With AutoAttack(draws=K), K > 1 (the default for a model whose
logits change between model keys), the rule is:

1. Each point's candidates are its clean point, then the output of every attack pass (each attack,
   each target class of a targeted one) in order. Each candidate is classified in K independent
   model draws; the kept candidate is the one classified correctly in the fewest draws (on a tie
   the earlier one stays).
2. A point goes on to the next attack pass while its kept candidate is classified correctly in at
   least one of its K draws.
3. The robust accuracy is the mean over points of the share of K fresh draws, independent of the
   selection's, that classify the kept candidate correctly; the clean accuracy is the mean share of
   the clean point's K draws (no choice was made on them).

1 and 2 are PR #105's rule. 3 differs: the PR reports the selection share itself, the minimum over
the candidates of their K-draw estimates, which is biased low (the minimum of noisy estimates
underestimates the smallest true rate); fresh draws give an unbiased estimate of how often the
randomised model classifies the final examples correctly. The PR's number is kept as well
(AutoAttackResult.selection_rate, results.json's autoattack_acc_selection). Also unlike the PR,
a point's draws are its own (each point is evaluated alone under vmap, from a key folded from its
position), so counts do not depend on the chunking or device count, and a model declared
randomised (version 'rand') whose logits do not change between keys keeps the single evaluation:
its K draws would all agree, which is the same rule.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# K: PR #105's default eval_iter, as the EOT draws of the rand version. The share of K draws has
# a standard error of at most 0.5 / sqrt(K) = 0.11 per point (0.11 / sqrt(n) on the accuracy),
# and a candidate misclassified with probability q escapes detection in all K draws with
# probability (1 - q)^K (0.12 at q = 0.1). Its cost, 2K forward passes per candidate, is small
# next to the rand version's 100 x 20 gradient passes per attack.
DRAWS = 20
STREAM = 0x5EED  # folded into a run's keys for the draws, apart from the attacks' keys
RULE = ("kept: the candidate (clean point, then each attack pass's output) classified correctly "
        "in the fewest of K draws; attacked on while correct in >= 1; robust accuracy: mean share "
        "of K fresh draws correct on the kept candidate (fra31/auto-attack PR #105, fresh draws)")


def correct_counts(apply_fn: Callable[[Any, jax.Array, jax.Array], jax.Array], variables: Any,
                   x: jax.Array, y: jax.Array, keys: jax.Array, draws: int) -> jax.Array:
  """Per point, in how many of `draws` model draws it is classified correctly. Draw k of point i
  uses fold_in(keys[i], k), and each point is evaluated alone (vmap), so its count does not
  depend on which points share its chunk."""

  def one(xi, yi, key):
    def body(k, c):
      logits = apply_fn(variables, xi[None], jax.random.fold_in(key, k))[0]
      return c + (jnp.argmax(logits) == yi).astype(jnp.int32)
    return jax.lax.fori_loop(0, draws, body, jnp.int32(0))

  return jax.vmap(one)(x, y, keys)


class Selection:
  """Rules 1 and 2 on the host, for the points of this process (arrays indexed by position)."""

  def __init__(self, x: np.ndarray, clean_counts: np.ndarray, draws: int):
    self.draws = draws
    self.x_kept = x.copy()
    self.counts = np.asarray(clean_counts, np.int32).copy()  # correct draws of the kept one
    self.clean_counts = self.counts.copy()
    self.kept_from = np.full(len(x), -1)  # index of the attack whose output is kept; -1 clean

  def offer(self, pos: np.ndarray, x_cand: np.ndarray, counts: np.ndarray, attack: int
            ) -> np.ndarray:
    """Keeps each candidate classified correctly in fewer draws than the point's kept one;
    returns, per point of `pos`, whether it goes on (its kept one is correct in some draw)."""
    better = np.asarray(counts) < self.counts[pos]
    won = pos[better]
    self.counts[won], self.x_kept[won], self.kept_from[won] = (
        np.asarray(counts)[better], x_cand[better], attack)
    return self.counts[pos] > 0
