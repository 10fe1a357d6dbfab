"""AutoAttack in JAX (Croce & Hein, ICML 2020): APGD-CE, APGD-T, FAB-T and Square, composed
(the standard version; also rand, and plus with APGD-DLR, untargeted FAB and restarts).

For a model of your own, `evaluate(logits_fn, images, labels, eps)` with `logits_fn(x) -> logits`
(float32 NHWC images in [0, 1]; `randomized=True` for `logits_fn(x, key)`); for this library's
checkpoints, `python -m fastadv_jax.evaluate --workdir=W --attack=autoattack`. Every attack is a
`Component` record (component.py) in a live registry: the built-in ones are in apgd.py, fab.py
and square.py, and `register(Component(...))` adds one from outside the package; runner.py
composes them over the local devices without knowing any of them by name.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from fastadv_jax.autoattack import draws, runner
from fastadv_jax.autoattack.component import (NORMS, Component, Context, Settings, components, get,
                                              names, register, unregister)
from fastadv_jax.autoattack.runner import (RESTARTS, VERSIONS, AttackRecord, AutoAttack,
                                           AutoAttackResult, NonFiniteOutputError, check_classes,
                                           check_norm, check_restarts, output_classes,
                                           parse_attacks, version_of)

__all__ = ["ATTACKS", "GRADIENT_BASED", "NORMS", "RESTARTS", "TARGETED", "VERSIONS",
           "AttackRecord", "AutoAttack", "AutoAttackResult", "Component", "Context",
           "NonFiniteOutputError", "Settings", "check_classes", "check_norm", "check_restarts",
           "components", "evaluate", "get", "names", "output_classes", "parse_attacks",
           "register", "unregister", "version_of"]


def __getattr__(name: str) -> Any:
  """ATTACKS, TARGETED, GRADIENT_BASED: name tuples derived from the live registry."""
  if name in ("ATTACKS", "TARGETED", "GRADIENT_BASED"):
    return getattr(runner, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate(logits_fn: Callable[..., jax.Array], images: np.ndarray, labels: np.ndarray,
             eps: float, attacks: str | Sequence[str] = "standard", num_classes: int | None = None,
             seed: int = 0, batch_size: int = 500, progress: bool = True,
             randomized: bool = False, **kwargs) -> AutoAttackResult:
  """AutoAttack of `logits_fn(x)`, or of `logits_fn(x, key)` when `randomized=True`.

  The calling convention is what `randomized` says, never guessed from the signature (a
  `functools.partial(model.apply, variables)` takes any arguments, and a key passed to it would
  land in `train`). A `logits_fn` that cannot be called without a key while randomized=False is
  a ValueError asking for randomized=True; a randomised model that draws without a key is only
  flagged in `.warnings` ("outputs change between calls"). With randomized=True use
  attacks='rand' (EOT) for a faithful evaluation; a model whose logits change between keys is
  then evaluated over `draws` model draws per candidate (draws.py states the rule: the
  candidate correct in the fewest draws is kept, and `.accuracy` is the mean share of fresh
  draws correct on it). Logits that change with the batch a point is evaluated in (BatchNorm in
  train mode?) are flagged in `.warnings` too.

  Returns an AutoAttackResult: `.accuracy`, `.robust`, `.x_adv`, per-attack `.records` and
  `.warnings`; a point is robust only if it is classified correctly without attack. NaN or Inf
  logits on any point raise NonFiniteOutputError. `kwargs` go to AutoAttack (apgd_steps,
  fab_steps, square_queries, ...).
  """
  if randomized:
    apply_fn = lambda _, x, key: logits_fn(x, key)  # noqa: E731
  else:
    apply_fn = lambda _, x, key: logits_fn(x)  # noqa: E731
  image_shape = np.shape(images)[1:]
  classes = _checked_output_classes(logits_fn, apply_fn, image_shape, randomized)
  attack = AutoAttack(apply_fn, classes if num_classes is None else num_classes, eps, attacks,
                      batch_size=batch_size, progress=progress, **kwargs)
  return attack.run((), images, labels, seed)


def _checked_output_classes(logits_fn: Callable[..., jax.Array], apply_fn: runner.ApplyFn,
                            image_shape: tuple, randomized: bool) -> int:
  """The number of logits (traced, not run); a calling convention that does not fit
  `logits_fn` is a one-line ValueError saying which `randomized` to pass."""
  try:
    return output_classes(apply_fn, (), image_shape)
  except TypeError as e:
    other = ((lambda _, x, key: logits_fn(x)) if randomized
             else (lambda _, x, key: logits_fn(x, key)))
    try:
      output_classes(other, (), image_shape)
    except Exception:  # pylint: disable=broad-except  (the original error is the one to show)
      raise e from None
    if randomized:
      raise ValueError("logits_fn cannot be called as logits_fn(x, key) but can as logits_fn(x):"
                       " it is deterministic, so pass randomized=False") from None
    raise ValueError("logits_fn cannot be called as logits_fn(x) but can as logits_fn(x, key): "
                     "for a randomised model pass randomized=True (and attacks='rand')") from None
