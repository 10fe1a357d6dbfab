"""The method registry: every training method, the paper names (presets) that select them, and
the functional front door to their perturbations and regularisers.

The registry is open: `register(Method(...))` from any module adds a method, and everything that
reads methods (the step, config validation, the config files' method argument, the sweep, the
benchmark) reads the live registry through `names`, `get` and `presets`. Code outside the
package is imported with `--config.plugins=my_pkg.my_method` or an installed entry point
(fastadv_jax/runtime/plugins.py). The built-in methods are registered here, one module each.

Hyperparameters are owned by each method (`Method.args`, a frozen dataclass with the published
values as defaults); in a config they are `config.method_args.<method>.<field>`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from fastadv_jax import randomness, registry
from fastadv_jax.methods import base
from fastadv_jax.methods.base import (ArgError, AttackInputs, Method, MethodOutputError, NoArgs,
                                      Perturbation, RegularizerInputs, RegularizerOutput)

__all__ = ["ArgError", "AttackInputs", "Method", "MethodOutputError", "NoArgs", "Perturbation",
           "RegularizerInputs", "RegularizerOutput", "get", "names",
           "perturb", "presets", "register", "regularizer", "unregister"]

_REGISTRY: registry.Registry[Method] = registry.Registry("method", Method)


def register(*records: Method) -> None:
  """Adds methods to the registry. Registering the same record again is a no-op (a module
  imported twice); another record under a taken name, or a preset name already used by another
  method, is a ValueError."""
  for m in records:
    _REGISTRY.register(m, check=_presets_free)


def _presets_free(m: Method) -> None:
  taken = presets()
  for p in m.presets:
    if p in taken:
      raise ValueError(f"preset {p!r} of method {m.name!r} is already a preset of "
                       f"{taken[p][0]!r}")


def unregister(name: str) -> None:
  _REGISTRY.unregister(name)


def names() -> tuple[str, ...]:
  """The registered method names, in registration order."""
  return _REGISTRY.names()


def get(name: str) -> Method:
  return _REGISTRY.get(name)


def presets() -> dict[str, tuple[str, Mapping[str, Any]]]:
  """Paper name -> (method, hyperparameters), e.g. "pgd10" -> ("pgd", {"steps": 10, ...})."""
  return {p: (m.name, values) for m in _REGISTRY for p, values in m.presets.items()}


def _resolve(method: str | Method) -> Method:
  return method if isinstance(method, Method) else get(method)


def perturb(method: str | Method, loss_fn: Callable[[jax.Array], jax.Array], x: jax.Array,
            y: jax.Array, key: jax.Array, eps: float | jax.Array, *, args: Any = None,
            logits_fn: Callable[[jax.Array], jax.Array] | None = None,
            init: str | None = None, carried: jax.Array | None = None,
            step: int | jax.Array = 0, progress: float | jax.Array = 1.0,
            axis_name: str | None = None) -> Perturbation:
  """A method's training perturbation, for any model and training loop.

  Args:
    method: a registered name ("nfgsm", "fgsm_rs", "pgd", ...) or a Method record.
    loss_fn: x (B, ...) -> per-example loss (B,) at the current weights, e.g.
      `lambda z: optax.softmax_cross_entropy_with_integer_labels(model(z), y)`.
    x, y: the batch, pixels in [0, 1]; integer labels (B,).
    key: one PRNG key for the batch (per-example keys are folded from it), or (B,) keys.
    eps: L-inf radius in pixel units (e.g. 8 / 255).
    args: the method's hyperparameter record; default: its published values.
    logits_fn: x -> logits (B, classes); needed by methods that compare outputs (GAT, NuAT).
    init: "zero" | "uniform" | "corner" for methods with a configurable start; default theirs.
    carried: the previous step's perturbation, for methods that carry one (Free-AT).
    step, progress: the iteration and the fraction of training done, for methods with a
      schedule (GAT / NuAT alternate their attack term; NuAT ramps its weight).
    axis_name: the device axis when called inside pmap / shard_map.
  Returns:
    Perturbation(delta (B, ...) under stop_gradient, clean_grad or None).
  """
  m = _resolve(method)
  keys = randomness.batch_keys(key, x.shape[0], axis_name)
  if m.carries_delta and carried is None:
    carried = jax.numpy.zeros_like(x)
  return base.checked_perturbation(m, m.perturb(AttackInputs(
      args=m.default_args() if args is None else args, loss_fn=loss_fn, logits_fn=logits_fn,
      x=x, y=y, keys=keys, eps=jax.numpy.asarray(eps, jax.numpy.float32), carried=carried,
      init=init or m.default_init, step=jax.numpy.asarray(step),
      progress=jax.numpy.asarray(progress, jax.numpy.float32), axis_name=axis_name)), x)


def regularizer(method: str | Method, forward: base.Forward, params: Any, x: jax.Array,
                y: jax.Array, delta: jax.Array, logits: jax.Array, key: jax.Array,
                eps: float | jax.Array, *, args: Any = None, state: Any = None,
                progress: float | jax.Array = 1.0, axis_name: str | None = None
                ) -> RegularizerOutput | None:
  """A method's term added to the cross-entropy (ELLE, GAT, NuAT), or None if it has none.

  `forward(params, x) -> (logits, aux)` is differentiated through, so call this inside the loss
  you take `jax.grad` of; `logits` are those the cross-entropy is taken on. Returns
  RegularizerOutput(local, value, state): add `local` to the loss (it equals `value` without a
  device axis), log `value`, and pass `state` back next step (ELLE-A; start from
  `method.init_state(args)`).
  """
  m = _resolve(method)
  if m.regularizer is None:
    return None
  a = m.default_args() if args is None else args
  if state is None and m.init_state is not None:
    state = m.init_state(a)  # (a method with init_state_for needs its state passed in)
  keys = randomness.batch_keys(key, x.shape[0], axis_name)
  return m.regularizer(RegularizerInputs(
      args=a, forward=forward, params=params, x=x, y=y, delta=delta, logits=logits, keys=keys,
      eps=jax.numpy.asarray(eps, jax.numpy.float32), state=state,
      progress=jax.numpy.asarray(progress, jax.numpy.float32), axis_name=axis_name))


# The built-in methods, one module each (imported after the registry exists: each imports only
# methods.base and the library, never this package's names).
from fastadv_jax.methods import (aaer, elle, fgsm, free, guided, liet, nfgsm, pco,  # noqa: E402
                                 pgd, pgi, standard, trades, uap, zerograd)

for _module in (standard, fgsm, free, pgd, nfgsm, zerograd, elle, guided, pgi, pco, aaer, trades,
                liet, uap):
  register(*_module.METHODS)
