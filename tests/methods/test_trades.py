"""TRADES (methods/trades.py): the KL and regulariser against NumPy with gradients through
both outputs, the attack against the authors' loop, on the eval-mode model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import losses, methods, randomness
from fastadv_jax.methods import trades
from test_train_step import _max_rel_err
from one_step_cases import N, attack_inputs, bn_model, linear, reg_inputs


def _trades_by_hand(logits_fn, x, keys, eps, steps, step_size, noise=0.001):
  """The authors' perturb loop (trades.py), written out."""
  clean = logits_fn(x)
  x_adv = x + noise * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
  for _ in range(steps):
    g = jax.grad(lambda z: jnp.sum(losses.kl_divergence(clean, logits_fn(z))))(x_adv)
    x_adv = x_adv + step_size * jnp.sign(g)
    x_adv = jnp.minimum(jnp.maximum(x_adv, x - eps), x + eps)
    x_adv = jnp.clip(x_adv, 0.0, 1.0)
  return x_adv - x


def _np_kl(p_logits, q_logits):
  p_logits, q_logits = np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64)
  lp = p_logits - np.log(np.exp(p_logits).sum(1, keepdims=True))
  lq = q_logits - np.log(np.exp(q_logits).sum(1, keepdims=True))
  return (np.exp(lp) * (lp - lq)).sum(1)


def test_trades_kl_and_regularizer_match_numpy_with_gradients_through_both_outputs():
  w, x, y, forward = linear()
  rng = np.random.default_rng(1)
  delta = jnp.asarray(rng.uniform(-0.1, 0.1, x.shape), jnp.float32)
  a, b = forward(w, x)[0], forward(w, x + delta)[0]
  np.testing.assert_allclose(losses.kl_divergence(a, b), _np_kl(a, b), rtol=1e-5, atol=1e-6)
  args = trades.TRADESArgs()

  def reg(params):
    clean = forward(params, x)[0]
    return trades.regularizer(reg_inputs(args, forward, params, x, y, delta, clean)).local

  assert float(reg(w)) == pytest.approx(6.0 * _np_kl(a, b).mean(), rel=1e-5)
  # The authors' KLDivLoss(log_softmax(f(x')), softmax(f(x))) differentiates through both.
  def reference(params):
    lp = jax.nn.log_softmax(forward(params, x)[0])
    lq = jax.nn.log_softmax(forward(params, x + delta)[0])
    return 6.0 * jnp.sum(jnp.exp(lp) * (lp - lq)) / N

  def clean_fixed(params):
    lp = jax.lax.stop_gradient(jax.nn.log_softmax(forward(params, x)[0]))
    lq = jax.nn.log_softmax(forward(params, x + delta)[0])
    return 6.0 * jnp.sum(jnp.exp(lp) * (lp - lq)) / N

  np.testing.assert_allclose(jax.grad(reg)(w), jax.grad(reference)(w), rtol=1e-4, atol=1e-7)
  assert _max_rel_err(jax.grad(reference)(w), jax.grad(clean_fixed)(w)) > 1e-2


def test_trades_attack_follows_the_authors_loop_and_raises_the_kl():
  w, x, y, forward = linear()
  logits_fn = lambda z: forward(w, z)[0]  # noqa: E731
  keys = randomness.example_keys(jax.random.key(2), jnp.arange(N))
  eps = 0.031
  kl = lambda d: np.asarray(losses.kl_divergence(logits_fn(x), logits_fn(x + d)))  # noqa: E731
  prev = kl(trades.gaussian_start(keys, x, 0.001))
  for steps in (1, 3, 10):
    args = trades.TRADESArgs(steps=steps)
    delta = trades.kl_attack(logits_fn, x, eps, args, keys)
    np.testing.assert_allclose(delta, _trades_by_hand(logits_fn, x, keys, eps, steps, 0.007),
                               atol=1e-6)
    assert float(jnp.max(jnp.abs(delta))) <= eps + 1e-6
    now = kl(delta)
    assert np.all(now > prev)  # every example's KL rose
    prev = now


def test_trades_attacks_the_eval_mode_model():
  x, y, train_logits, eval_logits = bn_model()
  eps, args = 0.1, trades.TRADESArgs(steps=3)
  inp = attack_inputs("trades", x, y, train_logits, eval_logits, eps, args)
  delta = methods.get("trades").perturb(inp).delta
  by_hand = _trades_by_hand(eval_logits, x, inp.keys, eps, 3, args.alpha * eps)
  np.testing.assert_allclose(delta, by_hand, atol=1e-6)
  train_mode = _trades_by_hand(train_logits, x, inp.keys, eps, 3, args.alpha * eps)
  assert float(jnp.mean(jnp.abs(by_hand - train_mode) > 1e-3)) > 0.05
