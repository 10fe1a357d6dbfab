"""What a training step should cost: each kind of network pass timed on its own, and a step's
expected time as the sum of the passes its method's algorithm needs (`methods.base.Passes`).

A method that costs more than its passes imply spends the difference outside the network: a
sort, a copy of a table, a pass the code repeats. The benchmark prints both (`benchmark.py
--passes`), so the table says where such overhead is, not only how large a step is.

The expected step time is plain training's step (one weight-gradient pass, the optimiser
update, the batch's conversion, the logged norms) plus the method's other passes, each at its
marginal cost: t_k = (T_k(3) - T_k(1)) / 2, with T_k(n) the time of a program that makes n
dependent passes of kind k over the step's batch, in train mode (batch statistics), with the
weights the step trains. A program's first pass costs more than the next ones on XLA:CPU (by
about half a pass on the small CNN), and a step is one program: passes timed one per program
would overstate what a step's extra passes cost. A pass over a 3B batch counts 3 passes over
B: where a larger batch costs more per example (ELLE's 3B batch on the small CNN), the
difference shows as overhead. GradAlign's jvp formulation counts as the one second-order pass
the algorithm needs, though it computes g2 by a plain input gradient and then a reverse-over-
forward pass: what that costs beyond it shows too.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fastadv_jax import losses, methods, parallel
from fastadv_jax.methods.base import Passes
from fastadv_jax.training import timing

KINDS = Passes._fields  # forward, input_grad, weight_grad, second_order
REPEATS = (1, 3)        # the passes per program of each kind's two timers


def gradalign_passes(config: ml_collections.ConfigDict, reuses_clean_grad: bool) -> Passes:
  """GradAlign's own passes: g2 differentiated with respect to the weights (g1 too with
  `grad_align_backprop_g1`), and g1 unless the attack already took the clean gradient."""
  if float(config.grad_align_lambda) <= 0:
    return Passes()
  if config.grad_align_backprop_g1:
    return Passes(second_order=2)
  return Passes(input_grad=0 if reuses_clean_grad else 1, second_order=1)


def step_passes(config: ml_collections.ConfigDict, reuses_clean_grad: bool) -> Passes | None:
  """The passes of one step of `config`'s method and GradAlign term; None if the method does
  not declare its own (`Method.passes`)."""
  method = methods.get(config.method)
  if method.passes is None:
    return None
  own, extra = method.passes(method.args_from(config)), gradalign_passes(config,
                                                                           reuses_clean_grad)
  return Passes(*(a + b for a, b in zip(own, extra)))


def marginal_pass_s(timed_s: dict[tuple[str, int], float]) -> dict[str, float]:
  """kind -> seconds of one more pass in a program, from (kind, repeats) -> program seconds."""
  lo, hi = REPEATS
  return {k: max(timed_s[k, hi] - timed_s[k, lo], 0.0) / (hi - lo) for k in KINDS}


def expected_step_s(passes: Passes, pass_s: dict[str, float], standard_step_s: float) -> float:
  """Seconds one step should take: plain training's step plus the passes beyond its one
  weight gradient, each at its marginal time."""
  extra = passes._replace(weight_grad=passes.weight_grad - 1)
  return standard_step_s + sum(n * pass_s[k] for k, n in zip(KINDS, extra))


def pass_functions(apply_fn: Callable, axis_name: str) -> dict[str, Callable]:
  """kind -> f(variables, x, y) doing one such pass in train mode (per device, for pmap)."""

  def logits(params, variables, x):
    out, _ = apply_fn({"params": params, "batch_stats": variables["batch_stats"]}, x,
                      train=True, mutable=["batch_stats"])
    return out

  def summed_ce(params, variables, x, y):
    return jnp.sum(losses.cross_entropy(logits(params, variables, x), y))

  def input_grad(params, variables, x, y):
    return jax.grad(summed_ce, argnums=2)(params, variables, x, y)

  def second_order(variables, x, y):
    # d/d theta of a scalar of the input gradient, as GradAlign's cosine is.
    weights = jax.lax.stop_gradient(x)
    grads = jax.grad(lambda p: jnp.sum(input_grad(p, variables, x, y) * weights))(
        variables["params"])
    return parallel.pmean(grads, axis_name)

  def weight_grad(variables, x, y):
    grads = jax.grad(lambda p: summed_ce(p, variables, x, y) / y.shape[0])(variables["params"])
    return parallel.pmean(grads, axis_name)

  return {
      "forward": lambda v, x, y: logits(v["params"], v, x),
      "input_grad": lambda v, x, y: input_grad(v["params"], v, x, y),
      "weight_grad": weight_grad,
      "second_order": second_order,
  }


def repeated(fn: Callable, repeats: int) -> Callable:
  """`fn` made `repeats` times in a row, each pass's input depending on all of the previous
  pass's output (a negligible nudge), so that XLA can neither drop, merge nor overlap them."""

  def chained(variables, x, y):
    for _ in range(repeats):
      out = fn(variables, x, y)
      x = x + 1e-30 * sum(jnp.sum(leaf) for leaf in jax.tree.leaves(out))
    return x
  return chained


class PassTimer:
  """`repeats` passes of one kind in one program, pmapped over the local devices as the step
  is, on replicated variables and a batch; `window(steps)` as `benchmark.StepTimer.window`."""

  def __init__(self, kind: str, repeats: int, apply_fn: Callable, variables: Any,
               images: jax.Array, labels: jax.Array):
    fn = repeated(pass_functions(apply_fn, parallel.AXIS)[kind], repeats)
    self.kind, self.repeats = kind, repeats
    self.fn = jax.pmap(fn, axis_name=parallel.AXIS)
    self.args = (variables, jax.pmap(lambda im: im.astype(jnp.float32) / 255.0)(images), labels)
    self.window(1)  # compile
    self.one_step_s = self.window(1)

  def window(self, steps: int) -> float:
    clock = timing.Stopwatch()
    out = None
    for _ in range(steps):
      out = self.fn(*self.args)
    return clock.stop(wait_for=out) / steps


def reuses_clean_grad(config: ml_collections.ConfigDict, x: jax.Array, y: jax.Array) -> bool:
  """Whether the method's attack hands the step its gradient at the clean point (FGSM from
  zero), which GradAlign then reuses as g1: read off the traced attack, on a linear model."""
  method = methods.get(config.method)
  w = jnp.ones((int(np.prod(x.shape[1:])), 10), jnp.float32) / 100.0
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731

  def attack(x_):
    return methods.perturb(method, lambda z: losses.cross_entropy(logits_fn(z), y), x_, y,
                           jax.random.key(0), float(config.eps), args=method.args_from(config),
                           logits_fn=logits_fn, init=method.init_kind(config)).clean_grad

  try:
    return jax.eval_shape(attack, x) is not None
  except Exception:  # pylint: disable=broad-except  # it needs the step's state, keys, ...
    return False  # (the expected cost then counts g1 as a pass of its own)
