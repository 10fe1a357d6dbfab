"""The config argument shared by the paper configs: `<method>[,eps=E][,seed=S][,<field>=<v>]...`.

`<method>` is a paper name from the method registry (fastadv_jax.methods.presets(): fgsm,
fgsm_rs, free, pgd2, pgd10, gradalign, ...). Keys after it override config fields, or the
method's own hyperparameters by their short name (`pgd10,steps=7` sets method_args.pgd.steps)
or full path (`method_args.pgd.steps=7`); `eps` is in units of 1/255 as in the paper. A config file builds its config in this order, so that each
value is set once and derived values see every override:
  1. dataset and model settings; 2. `apply_preset` (the method's fields) and the file's
  per-method settings; 3. `finish`: the overrides, exactly once, then the derived values
  (GradAlign's lambda(eps), a method's lambda(eps)) unless an override set them.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from fastadv_jax import methods



def apply_preset(config: ml_collections.ConfigDict, preset: str) -> None:
  """Sets config.method and the preset's hyperparameters; GradAlign's lambda is reset to 0 (a
  config file sets it for the `gradalign` preset after its overrides)."""
  table = methods.presets()
  if preset not in table:
    raise ValueError(f"unknown method {preset!r}; choose from {tuple(table)}")
  name, values = table[preset]
  config.grad_align_lambda = 0.0
  config.method = name
  for k, v in values.items():
    config.method_args[name][k] = v


def parse_arg(arg: str) -> tuple[str, dict[str, str]]:
  """'pgd10,eps=8,seed=1' -> ('pgd10', {'eps': '8', 'seed': '1'})."""
  parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
  names = tuple(methods.presets())
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


def _field_path(c: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the ConfigDict holding `key`, its last name): a top-level field, a dotted path
  (`method_args.pgd.steps`), or a hyperparameter of the config's method or model by its short
  name (`steps`, `n_filters`)."""
  if "." in key:
    *parents, last = key.split(".")
    holder = c
    for p in parents:
      if p not in holder or not isinstance(holder[p], ml_collections.ConfigDict):
        raise ValueError(f"config argument: unknown field {key!r}")
      holder = holder[p]
    if last not in holder:
      raise ValueError(f"config argument: unknown field {key!r}")
    return holder, last
  if key in c:
    return c, key
  for own in (c.method_args.get(c.method), c.model_args.get(c.model)):
    if own is not None and key in own:
      return own, key
  raise ValueError(f"config argument: unknown field {key!r} (neither a config field nor a "
                   f"hyperparameter of {c.method} or {c.model})")


def apply_overrides(c: ml_collections.ConfigDict, kv: dict[str, str]) -> None:
  """eps=E is in 1/255; other keys set fields of the same type (seed=1, num_epochs=5, steps=7)."""
  for k, v in kv.items():
    if k == "eps":
      c.eps = float(v) / 255.0
      continue
    holder, name = _field_path(c, k)
    current = holder[name]
    holder[name] = ((v.lower() in ("1", "true", "yes")) if isinstance(current, bool)
                    else type(current)(v))


def finish(c: ml_collections.ConfigDict, preset: str, kv: dict[str, str],
           gradalign_lambda: Callable[[float], float]) -> ml_collections.ConfigDict:
  """Applies the overrides once, then the derived values that no override set."""
  apply_overrides(c, kv)
  own = c.method_args.get(c.method)
  for k, v in methods.get(c.method).derived(c).items():  # the method's own, e.g. ELLE's lambda
    if k not in kv and f"method_args.{c.method}.{k}" not in kv:
      own[k] = v
  if preset == "gradalign" and "grad_align_lambda" not in kv:
    c.grad_align_lambda = gradalign_lambda(c.eps)
  return c
