"""The method registry: every training method, and the paper names (presets) that select them.

Adding a method = one module here with a `METHODS` tuple of `base.Method` records, listed in
`_MODULES`. Everything else (the step, config validation, the config files' method argument,
the sweep, the benchmark, the README table) reads `NAMES`, `get` and `PRESETS`.
"""
from __future__ import annotations

from typing import Any, Mapping

from fastadv_jax.methods import elle, fgsm, free, guided, nfgsm, pgd, standard, zerograd
from fastadv_jax.methods.base import Method

_MODULES = (standard, fgsm, free, pgd, nfgsm, zerograd, elle, guided)

REGISTRY: dict[str, Method] = {m.name: m for mod in _MODULES for m in mod.METHODS}
NAMES: tuple[str, ...] = tuple(REGISTRY)
# Paper name -> (method, config fields). e.g. "pgd10" -> ("pgd", {"pgd_steps": 10, ...}).
PRESETS: dict[str, tuple[str, Mapping[str, Any]]] = {
    preset: (m.name, fields) for m in REGISTRY.values() for preset, fields in m.presets.items()}


def get(name: str) -> Method:
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; choose from {NAMES}")
  return REGISTRY[name]


def apply_preset(config, preset: str) -> None:
  """Sets config.method and the preset's fields; GradAlign's lambda is reset to 0 (a config
  file sets it for the `gradalign` preset after its overrides)."""
  if preset not in PRESETS:
    raise ValueError(f"unknown method {preset!r}; choose from {tuple(PRESETS)}")
  name, fields = PRESETS[preset]
  config.grad_align_lambda = 0.0
  config.method = name
  for k, v in fields.items():
    config[k] = v
