"""The benchmark's yardstick (fastadv_jax/training/pass_costs.py): what each kind of pass
computes, how a step's passes add up, and which passes each method declares."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import methods
from fastadv_jax.training import pass_costs
from fastadv_jax.configs import default
from fastadv_jax.methods.base import Passes

B, D, C = 4, 6, 3


def _linear_apply(variables, x, train, mutable):
  """A linear model with the flax signature the passes call (no statistics to update)."""
  assert train and mutable == ["batch_stats"]
  return x.reshape(x.shape[0], -1) @ variables["params"]["w"], {"batch_stats": {}}


def _problem():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((D, C)), jnp.float32)
  x = jnp.asarray(rng.random((B, D)), jnp.float32)
  y = jnp.asarray([0, 2, 1, 2], jnp.int32)
  return {"params": {"w": w}, "batch_stats": {}}, x, y


def test_each_pass_computes_what_it_is_named_after():
  v, x, y = _problem()
  fns = pass_costs.pass_functions(_linear_apply, axis_name=None)
  w = v["params"]["w"]
  p = jax.nn.softmax(x @ w)
  err = p - jax.nn.one_hot(y, C)  # d sum CE / d logits
  np.testing.assert_allclose(fns["forward"](v, x, y), x @ w, rtol=1e-6)
  np.testing.assert_allclose(fns["input_grad"](v, x, y), err @ w.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fns["weight_grad"](v, x, y)["w"], x.T @ err / B, rtol=1e-5,
                             atol=1e-6)
  # d/dw sum(g * x) with g = err w^T, checked against central differences in float64.
  got = np.asarray(fns["second_order"](v, x, y)["w"])

  def f(w64):
    z = np.asarray(x, np.float64) @ w64
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    g = (q - np.eye(C)[np.asarray(y)]) @ w64.T
    return float(np.sum(g * np.asarray(x, np.float64)))

  w64, h = np.asarray(w, np.float64), 1e-6
  num = np.zeros_like(w64)
  for i in np.ndindex(w64.shape):
    e = np.zeros_like(w64)
    e[i] = h
    num[i] = (f(w64 + e) - f(w64 - e)) / (2 * h)
  np.testing.assert_allclose(got, num, rtol=1e-4, atol=1e-5)


def test_repeated_makes_every_pass_and_chains_them():
  calls, seen = [], []

  def fn(v, x, y):
    calls.append(1)
    seen.append(x)
    return {"a": x * 2.0}

  out = jax.jit(pass_costs.repeated(fn, 3))(None, jnp.ones((2,)), None)
  assert len(calls) == 3
  # Each pass's input is the previous one's, nudged by its output: nothing for XLA to merge.
  assert all(a is not b for a, b in zip(seen, seen[1:]))
  np.testing.assert_allclose(out, 1.0)


def test_marginal_time_and_expected_step():
  timed = {(k, 1): 1.0 for k in pass_costs.KINDS}
  timed.update({(k, 3): 1.0 + 2 * t for k, t in zip(pass_costs.KINDS, (0.1, 0.2, 0.3, 0.5))})
  pass_s = pass_costs.marginal_pass_s(timed)
  assert pass_s == pytest.approx({"forward": 0.1, "input_grad": 0.2, "weight_grad": 0.3,
                                  "second_order": 0.5})
  # Plain training's step holds one weight gradient; the rest are added at marginal cost.
  assert pass_costs.expected_step_s(Passes(weight_grad=1), pass_s, 2.0) == 2.0
  assert pass_costs.expected_step_s(Passes(input_grad=10, weight_grad=1), pass_s, 2.0
                                    ) == pytest.approx(4.0)
  assert pass_costs.expected_step_s(Passes(forward=1, input_grad=1, weight_grad=4), pass_s, 2.0
                                    ) == pytest.approx(2.0 + 0.1 + 0.2 + 0.9)


def _config(method, **kw):
  """The default config (a GradAlign run) with `method`, without GradAlign unless asked."""
  c = default.get_config()
  c.method, c.grad_align_lambda = method, 0.0
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_step_passes_add_gradalign_to_the_method():
  assert pass_costs.step_passes(_config("fgsm"), True) == Passes(input_grad=1, weight_grad=1)
  ga = _config("fgsm", grad_align_lambda=0.2)
  assert pass_costs.step_passes(ga, True) == Passes(input_grad=1, weight_grad=1, second_order=1)
  assert pass_costs.step_passes(ga, False) == Passes(input_grad=2, weight_grad=1, second_order=1)
  full = _config("fgsm", grad_align_lambda=0.2, grad_align_backprop_g1=True)
  assert pass_costs.step_passes(full, True) == Passes(input_grad=1, weight_grad=1,
                                                      second_order=2)
  pgd = _config("pgd")
  pgd.method_args.pgd.steps = 7
  assert pass_costs.step_passes(pgd, False) == Passes(input_grad=7, weight_grad=1)


def test_every_built_in_method_declares_its_passes_and_a_plugin_may_not():
  for name in methods.names():
    m = methods.get(name)
    p = m.passes(m.default_args())
    assert isinstance(p, Passes) and p.weight_grad >= 1, name
  bare = dataclasses.replace(methods.get("fgsm"), name="no_passes_declared", passes=None,
                             presets={})
  methods.register(bare)
  try:
    assert pass_costs.step_passes(_config("no_passes_declared"), False) is None
  finally:
    methods.unregister("no_passes_declared")


def test_clean_gradient_reuse_is_read_off_the_attack():
  x, y = jnp.zeros((2, 4, 4, 1)), jnp.zeros((2,), jnp.int32)
  assert pass_costs.reuses_clean_grad(_config("fgsm"), x, y)
  assert not pass_costs.reuses_clean_grad(_config("fgsm", attack_init="uniform"), x, y)
  assert not pass_costs.reuses_clean_grad(_config("fgsm_rs"), x, y)
  assert not pass_costs.reuses_clean_grad(_config("liet"), x, y)  # needs the step's state
