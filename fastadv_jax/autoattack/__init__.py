"""AutoAttack in JAX (Croce & Hein, ICML 2020): APGD-CE, APGD-T, FAB-T and Square, composed.

For a model of your own, `evaluate(logits_fn, images, labels, eps)` with `logits_fn(x) -> logits`
(float32 NHWC images in [0, 1]); for this library's checkpoints, `python -m fastadv_jax.evaluate
--workdir=W --attack=autoattack`. The attacks are in apgd.py, fab.py and square.py; runner.py
composes them over the local devices.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import jax
import numpy as np

from fastadv_jax.autoattack.runner import (ATTACKS, TARGETED, VERSIONS, AttackRecord, AutoAttack,
                                           AutoAttackResult, check_classes, output_classes,
                                           parse_attacks)

__all__ = ["ATTACKS", "TARGETED", "VERSIONS", "AttackRecord", "AutoAttack", "AutoAttackResult",
           "check_classes", "evaluate", "output_classes", "parse_attacks"]


def evaluate(logits_fn: Callable[..., jax.Array], images: np.ndarray, labels: np.ndarray,
             eps: float, attacks: str | Sequence[str] = "standard", num_classes: int | None = None,
             seed: int = 0, batch_size: int = 500, progress: bool = True,
             **kwargs) -> AutoAttackResult:
  """AutoAttack of `logits_fn(x)` (or `logits_fn(x, key)` for a randomised model).

  Returns an AutoAttackResult: `.accuracy`, `.robust`, `.x_adv`, per-attack `.records` and
  `.warnings`. `kwargs` go to AutoAttack (apgd_steps, fab_steps, square_queries, ...).
  """
  takes_key = len(inspect.signature(logits_fn).parameters) >= 2
  apply_fn = ((lambda _, x, key: logits_fn(x, key)) if takes_key
              else (lambda _, x, key: logits_fn(x)))
  if num_classes is None:
    num_classes = output_classes(apply_fn, (), np.shape(images)[1:])
  attack = AutoAttack(apply_fn, num_classes, eps, attacks, batch_size=batch_size,
                      progress=progress, **kwargs)
  return attack.run((), images, labels, seed)
