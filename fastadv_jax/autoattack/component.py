"""The one protocol every AutoAttack component implements, and the live registry of them.

The runner (runner.py) knows nothing about any particular attack: it asks a `Component` record
for its initial state, runs its `body` in blocks of `block` iterations (host-driven, unrolled on
CPU), and asks it for the verdict (`finish`). The built-in components (apgd.py, fab.py,
square.py) register themselves the same way a plugin does, so adding an attack is one
`register(Component(...))` call in a module the user imports (or names with `--plugins`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from fastadv_jax import registry

__all__ = ["NORMS", "Component", "Context", "Settings", "components", "get", "names", "register",
           "unregister"]

State = Any  # a pytree of arrays with a leading per-point axis (or scalars)

NORMS = ("Linf", "L2", "L1")  # the threat models a component can support (Settings.norm)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run-wide knobs of an AutoAttack run, as components read them.

  `norm` is the threat model, one of NORMS: "Linf" (eps bounds every pixel's change), "L2"
  (eps bounds the Euclidean norm of the whole perturbation) or "L1" (eps bounds the sum of the
  absolute changes). `options` carries settings of components from outside the package
  (AutoAttack(options=...)), so a plugin needs no new keyword in the runner.
  """
  apgd_steps: int = 100
  fab_steps: int = 100
  square_queries: int = 5000
  eot_iter: int = 1
  n_targets: int = 9
  norm: str = "Linf"
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Context:
  """What a component sees on one device's chunk of points (everything traced but settings).

  logits_fn(z, key) -> logits: the model (`key` drives a randomised one; pass `model_key` or a
  key folded from it). x: float32 NHWC clean points in [0, 1]; y: labels; target: the target
  class of a targeted component (the `rank`-th largest clean logit), else y; keys: one key per
  point, keyed by its position in the evaluated set (so results do not depend on the batch or
  device count); eps: the radius in `settings.norm`; rank: the target rank (0 for untargeted components).
  restart: which run of the component this is on the points still robust (0, 1, ...; traced),
  when the runner restarts it (AutoAttack(restarts=...)): every restart has its own keys and
  model_key (restart 0 those of a run without restarts), so a component with a random start
  gets a fresh one; a component that starts differently after the first run reads restart.
  """
  logits_fn: Callable[[jax.Array, jax.Array], jax.Array]
  x: jax.Array
  y: jax.Array
  target: jax.Array
  keys: jax.Array
  eps: jax.Array
  model_key: jax.Array
  rank: jax.Array
  settings: Settings
  restart: jax.Array | int = 0


@dataclasses.dataclass(frozen=True)
class Component:
  """One attack of the AutoAttack composition.

  init(ctx) -> state; body(ctx, i, state) -> state for iteration i (traced; i counts from 0);
  finish(ctx, state) -> (robust (n,) bool, x_adv): a point counts as broken only where robust
  is False, and x_adv must then lie in the eps-ball and [0, 1].
  iterations(settings): how many times body runs; block: iterations per host call (each block
  is one compiled, unrolled program). targeted: run once per target class (ranks 2 ..
  n_targets + 1, ctx.target set); gradient_based: used by the gradient-masking check.
  settled(state), optional, on the host after each block with the state's device arrays:
  per-point booleans; once all are True the remaining blocks are skipped (results must not
  change by stopping). norms: the threat models (NORMS) it implements; the runner refuses to
  run it under any other.
  """
  name: str
  init: Callable[[Context], State]
  body: Callable[[Context, jax.Array, State], State]
  finish: Callable[[Context, State], tuple[jax.Array, jax.Array]]
  iterations: Callable[[Settings], int]
  block: int = 10
  targeted: bool = False
  gradient_based: bool = True
  settled: Callable[[State], Any] | None = None
  summary: str = ""
  norms: tuple[str, ...] = ("Linf",)

  def __post_init__(self):
    if not self.name or "," in self.name or self.name != self.name.strip():
      raise ValueError(f"a component name must be non-empty, without commas or surrounding "
                       f"spaces, got {self.name!r}")
    if self.block < 1:
      raise ValueError(f"component {self.name!r}: block must be >= 1, got {self.block}")
    if not self.norms or any(n not in NORMS for n in self.norms):
      raise ValueError(f"component {self.name!r}: norms must be a non-empty subset of {NORMS}, "
                       f"got {self.norms!r}")


_REGISTRY: registry.Registry[Component] = registry.Registry("AutoAttack component", Component)


def register(*records: Component) -> None:
  """Adds components to the live registry. Registering the same record again is a no-op (a
  module imported twice); a different record under a taken name is a ValueError."""
  for c in records:
    _REGISTRY.register(c)


def unregister(name: str) -> None:
  _REGISTRY.unregister(name)


def names() -> tuple[str, ...]:
  """The registered component names, in registration order."""
  return _REGISTRY.names()


def components() -> dict[str, Component]:
  """A copy of the registry: name -> Component."""
  return {c.name: c for c in _REGISTRY}


def get(name: str) -> Component:
  return _REGISTRY.get(name)
