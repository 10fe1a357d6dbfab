"""The config argument shared by the paper configs: `<method>[,eps=E][,seed=S][,<field>=<v>]...`.

`<method>` is a paper name from the method registry (fastadv_jax.methods.PRESETS: fgsm,
fgsm_rs, free, pgd2, pgd10, gradalign, ...). Keys after it override config fields; `eps` is in
units of 1/255 as in the paper. A config file builds its config in this order, so that each
value is set once and derived values see every override:
  1. dataset and model settings; 2. `apply_preset` (the method's fields) and the file's
  per-method settings; 3. `finish`: the overrides, exactly once, then the derived values
  (GradAlign's lambda(eps), a method's lambda(eps)) unless an override set them.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from fastadv_jax import methods

apply_preset = methods.apply_preset


def parse_arg(arg: str) -> tuple[str, dict[str, str]]:
  """'pgd10,eps=8,seed=1' -> ('pgd10', {'eps': '8', 'seed': '1'})."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  names = tuple(methods.PRESETS)
  if not parts or "=" in parts[0]:
    raise ValueError(f"config argument {arg!r}: expected '<method>[,key=value...]' with method in "
                     f"{names}")
  preset, kv = parts[0], {}
  for p in parts[1:]:
    if "=" not in p:
      raise ValueError(f"config argument {arg!r}: {p!r} is not key=value")
    k, v = p.split("=", 1)
    kv[k.strip()] = v.strip()
  if preset not in names:
    raise ValueError(f"config argument {arg!r}: unknown method {preset!r}; choose from {names}")
  return preset, kv


def apply_overrides(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """eps=E is in 1/255; other keys set fields of the same type (seed=1, num_epochs=5, ...)."""
  for k, v in kv.items():
    if k == "eps":
      c.eps = float(v) / 255.0
    elif k not in c:
      raise ValueError(f"config argument: unknown field {k!r}")
    else:
      current = c[k]
      c[k] = (v.lower() in ("1", "true", "yes")) if isinstance(current, bool) else type(current)(v)


def finish(c: ml_collections.ConfigDict, preset: str, kv: dict[str, str],
           gradalign_lambda: Callable[[float], float]) -> ml_collections.ConfigDict:
  """Applies the overrides once, then the derived values that no override set."""
  apply_overrides(c, kv)
  derived = dict(methods.get(c.method).derived(c))
  if preset == "gradalign":
    derived["grad_align_lambda"] = gradalign_lambda(c.eps)
  for k, v in derived.items():
    if k not in kv:
      c[k] = v
  return c
