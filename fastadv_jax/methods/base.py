"""What a training method is: one record that the step, configs, validation, sweeps and
benchmark all read (see methods/__init__.py for the registry).

A method supplies the inner maximisation (`perturb`) and may add a regulariser on top of the
cross-entropy, carry a per-example perturbation from one step to the next (Free-AT), replay
each minibatch, or keep run-level state (ELLE-A's adaptive lambda). GradAlign is not a method
but a regulariser that goes on top of any of them (`config.grad_align_lambda`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import ml_collections

from fastadv_jax import attacks

Config = ml_collections.ConfigDict
Forward = Callable[[Any, jax.Array], tuple[jax.Array, Any]]  # (params, x) -> (logits, stats)


class AttackInputs(NamedTuple):
  """What a training perturbation sees (all per-device arrays)."""
  config: Config
  loss_fn: attacks.LossFn          # per-example CE at the current weights
  logits_fn: Callable[[jax.Array], jax.Array]  # logits at the current weights
  x: jax.Array                     # augmented batch in [0, 1]
  y: jax.Array
  keys: jax.Array                  # per-example attack keys
  eps: jax.Array                   # this iteration's eps (after any warm-up)
  carried: jax.Array | None        # the carried perturbation (Free-AT), else None
  init: str                        # the start: config.attack_init, else the method's default
  step: jax.Array                  # the iteration (0-based), e.g. for alternating attack terms
  progress: jax.Array              # fraction of training done after this step, in (0, 1]
  axis_name: str | None            # the device axis, for terms that couple examples (NuAT)


class Perturbation(NamedTuple):
  delta: jax.Array                 # under stop_gradient
  clean_grad: jax.Array | None = None  # input gradient at x, if computed anyway (GradAlign g1)


class RegularizerInputs(NamedTuple):
  """What a method's regulariser sees inside the differentiated loss."""
  config: Config
  forward: Forward
  params: Any
  x: jax.Array
  y: jax.Array
  delta: jax.Array
  logits: jax.Array                # logits at the point the cross-entropy is taken
  keys: jax.Array                  # per-example keys for the regulariser's own noise
  eps: jax.Array
  state: Any                       # run-level method state (replicated), or None
  progress: jax.Array              # fraction of training done after this step, in (0, 1]
  axis_name: str | None


class RegularizerOutput(NamedTuple):
  local: jax.Array                 # this device's share (pmean of its gradient = global grad)
  value: jax.Array                 # the global regulariser value, for logging
  state: Any = None                # the next run-level method state


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method. Only `name`, `summary` and `perturb` are required."""
  name: str
  summary: str                     # one line for the README table and --help texts
  perturb: Callable[[AttackInputs], Perturbation]
  # The start when config.attack_init is "" (zero | uniform | corner), for methods whose start
  # is configurable (FGSM family, PGD, ZeroGrad, ELLE); the others fix their own start.
  default_init: str = "zero"
  # Where the cross-entropy is taken: "adversarial" (x + delta) or "clean" (x; GAT, NuAT).
  ce_at: str = "adversarial"
  regularizer: Callable[[RegularizerInputs], RegularizerOutput] | None = None
  # Per-example perturbation carried across steps (Free-AT): the next one from the update's
  # own gradient with respect to delta: (config, delta, grad_delta, x, eps) -> carried.
  next_carried: Callable[..., jax.Array] | None = None
  # How many consecutive optimiser steps see the same minibatch (Free-AT's m).
  replays: Callable[[Config], int] = lambda config: 1
  # Run-level state (replicated over devices), e.g. ELLE-A's lambda: config -> pytree.
  init_state: Callable[[Config], Any] | None = None
  # Config values derived from others (e.g. a lambda that depends on eps), computed after all
  # overrides by the config files (configs/common.finish): config -> {field: value}.
  derived: Callable[[Config], Mapping[str, Any]] = lambda config: {}
  # Paper names that select this method, with the config fields each sets.
  presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def carries_delta(self) -> bool:
    return self.next_carried is not None

  def init_kind(self, config: Config) -> str:
    """The start of the perturbation: config.attack_init, or this method's default if ""."""
    return config.attack_init or self.default_init
