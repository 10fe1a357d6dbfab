"""AutoAttack's rule for randomised models (autoattack/draws.py, after fra31/auto-attack PR #105):
on a model whose per-draw correctness is known in closed form, the reported accuracies are
unbiased estimates of it; the reference's single draw leaves weaker final examples; on a
deterministic model the rule is the single evaluation."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import autoattack

EPS = 0.1
# Two classes, label 1: logits (0, A * (mean(x) - 0.5)) plus N(0, SIGMA^2) per logit and draw,
# so a draw classifies x correctly with probability Phi(A * (mean(x) - 0.5) / (SIGMA * sqrt 2)).
# Clean points at mean 0.5 + DELTA are correct in ~70 % of draws; the eps-ball's worst case,
# mean 0.5 + DELTA - EPS, in ~2 %.
A, SIGMA, DELTA = 25.7, 1 / math.sqrt(2), 0.0202


def _noisy(z, key):
  margin = A * (jnp.mean(z.reshape(z.shape[0], -1), 1) - 0.5)
  logits = jnp.stack([jnp.zeros_like(margin), margin], 1)
  return logits + SIGMA * jax.random.normal(key, logits.shape)


def _p_correct(x):
  """Per point, the closed-form probability that one draw classifies it as class 1."""
  m = A * (x.reshape(len(x), -1).mean(1).astype(np.float64) - 0.5) / (SIGMA * math.sqrt(2))
  return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in m])


def _points(n=160, seed=0):
  rng = np.random.default_rng(seed)
  x = 0.5 + DELTA + rng.uniform(-0.01, 0.01, size=(n, 4, 4, 1))
  return x.astype(np.float32), np.ones(n, np.int32)


def _within(estimate, p, draws, z=4.5):
  """|estimate - mean p| within z standard errors of a mean of n x `draws` Bernoulli(p_i)."""
  se = math.sqrt(np.sum(p * (1 - p))) / (len(p) * math.sqrt(draws))
  return abs(estimate - np.mean(p)) <= z * se + 1e-9


def _run(x, y, **kwargs):
  return autoattack.evaluate(_noisy, x, y, EPS, "apgd-ce", progress=False, randomized=True,
                             apgd_steps=5, eot_iter=2, **kwargs)


def test_the_reported_accuracies_match_the_closed_form():
  x, y = _points()
  res = _run(x, y)  # the default: K = draws.DRAWS for a model that changes between keys
  assert res.draws == autoattack.draws.DRAWS > 1
  assert _within(res.clean_accuracy, _p_correct(x), res.draws)
  p_kept = _p_correct(res.x_adv)
  assert _within(res.accuracy, p_kept, res.draws)
  assert np.all(np.abs(res.x_adv - x) <= EPS + 1e-6)
  assert res.accuracy < 0.1 < 0.5 < res.clean_accuracy  # the attack reached the worst case
  # Rules 1 and 2: the kept candidate has at most the clean point's correct draws; a point
  # counts as `robust` while some draw still classifies its kept candidate correctly.
  assert np.all(res.selection_rate <= res.clean_rate)
  np.testing.assert_array_equal(res.robust, res.selection_rate > 0)
  s = res.summary()
  assert s["autoattack_draws"] == res.draws and "fewest" in s["autoattack_draws_rule"]
  assert s["autoattack_acc"] == pytest.approx(np.mean(res.robust_rate))
  assert s["autoattack_acc_selection"] == pytest.approx(np.mean(res.selection_rate))


def test_a_single_draw_leaves_weaker_adversarial_examples():
  """The reference's rule (draws=1): a point misclassified by its one clean draw (~30 %) is
  never attacked, so its final example is the clean point, correct in ~70 % of fresh draws;
  the rule attacks it and keeps the eps-ball's worst case (~2 %)."""
  x, y = _points()
  p_clean = _p_correct(x)
  single = _run(x, y, draws=1)
  assert single.draws == 1 and single.robust_rate is None
  p_single = _p_correct(single.x_adv)  # the robustness of its final examples, in closed form
  unattacked = ~single.clean
  assert 0.1 < np.mean(unattacked) < 0.6
  np.testing.assert_array_equal(single.x_adv[unattacked], x[unattacked])
  # In expectation at least P(one clean draw wrong) * P(correct draw on the clean point).
  assert np.mean(p_single) >= 0.5 * np.mean((1 - p_clean) * p_clean)
  ruled = _run(x, y, draws=16)
  assert _within(ruled.accuracy, _p_correct(ruled.x_adv), 16)
  assert np.mean(p_single) > ruled.accuracy + 0.1
  assert np.mean(p_single) > np.mean(_p_correct(ruled.x_adv)) + 0.1


def test_on_a_deterministic_model_the_rule_is_the_single_evaluation():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(36, 5)).astype(np.float32)
  x = rng.uniform(size=(30, 6, 6, 1)).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
  y = np.asarray(np.argmax(logits_fn(x), -1))
  y[:3] = (y[:3] + 1) % 5  # a few points wrong without attack
  run = lambda **kw: autoattack.evaluate(logits_fn, x, y, EPS, "apgd-ce,apgd-dlr",  # noqa: E731
                                         progress=False, apgd_steps=3, **kw)
  default, ruled = run(), run(draws=3)
  assert default.draws == 1 and "autoattack_draws" not in default.summary()
  assert ruled.draws == 3
  for field in ("clean", "robust", "x_adv", "broken_by"):
    np.testing.assert_array_equal(getattr(default, field), getattr(ruled, field))
  assert ruled.accuracy == default.accuracy and ruled.clean_accuracy == default.clean_accuracy
  assert 0 < np.sum(ruled.robust) < np.sum(ruled.clean)


def test_draws_must_be_positive():
  x, y = _points(8)
  with pytest.raises(ValueError, match="draws must be >= 1"):
    _run(x, y, draws=0)
