"""LIET (methods/liet.py): the random-label-smoothing CE and the JS term against NumPy,
the class-wise starts in closed form and their refresh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import methods, randomness
from fastadv_jax.methods import liet
from stateful_cases import D, EPS, batch, inputs, linear, softmax


def test_random_label_smoothing_against_numpy():
  rng = np.random.default_rng(0)
  n, c, s = 6, 5, 0.6
  draws = rng.uniform(size=(n, c)).astype(np.float32)
  labels = rng.integers(0, c, n)
  t = np.asarray(liet.random_smoothed_targets(jnp.asarray(draws), jnp.asarray(labels), s))
  expect = np.zeros((n, c))
  for i in range(n):
    others = [j for j in range(c) if j != labels[i]]
    expect[i, labels[i]] = 1 - s
    expect[i, others] = s * draws[i, others] / draws[i, others].sum()
  np.testing.assert_allclose(t, expect, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
  # The loss draws fresh U(0, 1) per example from its keys: the same draws reproduce it.
  logits = rng.normal(size=(n, c)).astype(np.float32)
  keys = randomness.example_keys(jax.random.key(3), jnp.arange(n))
  d = np.asarray(randomness.uniform_like(keys, jnp.asarray(logits), 0.0, 1.0))
  ce = np.asarray(liet.random_smoothing_ce(jnp.asarray(logits), jnp.asarray(labels), keys, s))
  tt = np.asarray(liet.random_smoothed_targets(jnp.asarray(d), jnp.asarray(labels), s))
  logp = np.log(softmax(logits.astype(np.float64)))
  np.testing.assert_allclose(ce, -(tt * logp).sum(-1), rtol=1e-5)
  other_keys = randomness.example_keys(jax.random.key(4), jnp.arange(n))
  assert not np.allclose(ce, liet.random_smoothing_ce(jnp.asarray(logits), jnp.asarray(labels),
                                                      other_keys, s))  # the draws matter


def test_js_divergence_and_lambda_ramp():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  p, q = softmax(a), softmax(b)
  m = (p + q) / 2
  expect = 0.5 * ((p * np.log(p / m)).sum(-1) + (q * np.log(q / m)).sum(-1))
  np.testing.assert_allclose(liet.js_divergence(jnp.asarray(a, jnp.float32),
                                                jnp.asarray(b, jnp.float32)), expect, rtol=1e-4)
  args = liet.LIETArgs()
  assert float(liet.liet_lambda(args, jnp.float32(0.25))) == pytest.approx(25.0)
  assert float(liet.liet_lambda(args, jnp.float32(1.0))) == pytest.approx(100.0)


def test_liet_class_wise_start_in_closed_form_and_refreshed_every_20_steps():
  c, s = 4, 0.6
  w, logits_fn = linear(c)
  x, y = batch(0, c)
  args = methods.get("liet").make_args({"mask_min": 0.0, "mask_max": 0.0})  # no masking
  sentinel = {"li_sign": jnp.ones((c,) + D)}

  def closed_form(batch_key):
    # grad_x rLS-CE(Wx, c) = W^T (softmax(W x) - t_c) at x = 0.5, t_c from the class keys' draws.
    grey = np.full((c, int(np.prod(D))), 0.5, np.float32)
    logits = grey @ w.T
    draws = randomness.uniform_like(liet._class_keys(batch_key, c), jnp.asarray(logits), 0., 1.)
    t = np.asarray(liet.random_smoothed_targets(draws, jnp.arange(c), s))
    return np.sign((softmax(logits) - t) @ w).reshape((c,) + D)

  for step in (0, 1, 19, 20, 41):
    inp = inputs("liet", x, y, logits_fn, sentinel, step, args=args, eval_logits_fn=logits_fn)
    out = methods.get("liet").perturb(inp)
    li = np.asarray(out.state["li_sign"])
    if step % 20 == 0:
      expect = closed_form(inp.batch_key)
      assert np.all(expect != 0)
      np.testing.assert_array_equal(li, expect)
    else:
      np.testing.assert_array_equal(li, np.ones((c,) + D))  # kept between refreshes
    # The start is +-eps * LI_y with one sign for the whole batch; then one eps step.
    start = np.asarray(out.aux)
    signs = {float(v) for v in np.unique(np.sign(start / li[y]))}
    assert len(signs) == 1 and signs <= {-1.0, 1.0}
    np.testing.assert_allclose(np.abs(start), EPS, rtol=1e-5)
    d = np.asarray(out.delta)
    assert np.abs(d).max() <= EPS + 1e-6
  # Masking every element: the start is U(-eps, eps) noise, not the class-wise sign.
  full = methods.get("liet").make_args({"mask_min": 1.0, "mask_max": 1.0})
  out = methods.get("liet").perturb(inputs("liet", x, y, logits_fn, sentinel, 1, args=full))
  start = np.abs(np.asarray(out.aux))
  assert start.max() <= EPS and start.min() < 0.5 * EPS
