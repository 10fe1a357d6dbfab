"""AutoAttack in JAX: attacks against cases with known answers, the reference's schedules, the
composition, its sanity checks, and the same result on 1 and 8 devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import autoattack
from fastadv_jax.autoattack import apgd, fab, losses, square

EPS = 0.03


def _linear_problem(n=40, d=(6, 6, 1), k=5, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(int(np.prod(d)), k)).astype(np.float32)
  x = rng.uniform(size=(n,) + d).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
  y = np.asarray(np.argmax(logits_fn(x), -1))
  return w, x, y, logits_fn


def _exact_worst_margin(w, x, y, eps):
  """min over the eps-ball and [0, 1] of min_{j != y} z_y - z_j, exactly (a linear model's
  margin to each class is separable over pixels: each pixel goes to an end of its interval)."""
  xf = x.reshape(len(x), -1)
  lo, hi = np.maximum(-eps, -xf), np.minimum(eps, 1 - xf)
  worst = np.full(len(x), np.inf)
  for j in range(w.shape[1]):
    v = w[:, y].T - w[:, j][None]
    m = np.sum(v * xf, 1) + np.sum(np.minimum(v * lo, v * hi), 1)
    worst = np.minimum(worst, np.where(y == j, np.inf, m))
  return worst


def _check_adversarial(res, x, y, logits_fn, eps):
  """Every point counted as broken has an adversarial example in the ball and the box."""
  broken = ~res.robust & res.clean
  adv = res.x_adv[broken]
  assert np.all(np.abs(adv - x[broken]) <= eps + 1e-6)
  assert np.all((adv >= 0) & (adv <= 1))
  assert np.all(np.argmax(logits_fn(adv), -1) != y[broken])


@pytest.mark.parametrize("attacks", ["standard", "apgd-t", "fab-t"])
def test_linear_model_matches_the_exact_worst_case(attacks):
  w, x, y, logits_fn = _linear_problem()
  worst = _exact_worst_margin(w, x, y, EPS)
  res = autoattack.evaluate(logits_fn, x, y, EPS, attacks, progress=False, square_queries=300)
  _check_adversarial(res, x, y, logits_fn, EPS)
  clear = np.abs(worst) > 1e-3
  assert 0 < np.sum(worst[clear] > 0) < np.sum(clear)  # both outcomes occur
  np.testing.assert_array_equal(res.robust[clear], worst[clear] > 0)


def test_masked_gradients_stop_apgd_but_not_square():
  w, x, y, _ = _linear_problem(n=24, d=(10, 10, 1), seed=1)
  masked = lambda z: jax.lax.stop_gradient(z).reshape(z.shape[0], -1) @ w  # noqa: E731
  eps = 0.06
  worst = _exact_worst_margin(w, x, y, eps)
  breakable = int(np.sum(worst < 0))
  assert breakable >= 16
  apgd_only = autoattack.evaluate(masked, x, y, eps, "apgd-ce", progress=False)
  # No gradient: APGD stays at its random start, which breaks far fewer points.
  assert np.sum(~apgd_only.robust) < breakable // 2
  assert any("gradient of exactly zero" in m for m in apgd_only.warnings)
  res = autoattack.evaluate(masked, x, y, eps, "apgd-ce,square", progress=False)
  assert np.sum(~res.robust) >= breakable - 2  # a random search: all but a couple
  assert any("Square broke" in m for m in res.warnings)
  _check_adversarial(res, x, y, masked, eps)


def test_targeted_attacks_on_three_classes_give_the_clear_error():
  w, x, y, logits_fn = _linear_problem(k=3)
  for attacks in ("standard", "apgd-t", "fab-t"):
    with pytest.raises(ValueError, match="need at least 4 classes"):
      autoattack.evaluate(logits_fn, x, y, EPS, attacks, progress=False)
  res = autoattack.evaluate(logits_fn, x, y, EPS, "apgd-ce,apgd-dlr", progress=False)
  assert res.robust.shape == y.shape  # the untargeted attacks run


def test_bad_arguments_are_refused():
  _, x, y, logits_fn = _linear_problem()
  with pytest.raises(ValueError, match="unknown attack 'pgd'"):
    autoattack.evaluate(logits_fn, x, y, EPS, "apgd-ce,pgd")
  with pytest.raises(ValueError, match="eps must be in"):
    autoattack.evaluate(logits_fn, x, y, 0.0)
  with pytest.raises(ValueError, match="apgd_steps must be an integer >= 1, got 0"):
    autoattack.evaluate(logits_fn, x, y, EPS, apgd_steps=0)
  with pytest.raises(ValueError, match="square_queries must be an integer >= 1, got 10.5"):
    autoattack.evaluate(logits_fn, x, y, EPS, square_queries=10.5)
  with pytest.raises(ValueError, match="eps must be a finite number > 0"):
    autoattack.evaluate(logits_fn, x, y, float("inf"), norm="L2")


@pytest.mark.parametrize("change,message", [
    (lambda x, y: (x, np.where(np.arange(len(y)) == 3, 12, y)),
     r"labels must be class indices in \[0, 5\) for this 5-class model, got 12"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 0, -1, y)),
     r"labels must be class indices in \[0, 5\) .* got -1"),
    (lambda x, y: (x, y.astype(np.float32)), "labels must be integers, got dtype float32"),
    (lambda x, y: (x, y[:-1]), "labels must be one integer per image"),
    (lambda x, y: (x * 255.0, y), r"images must be in \[0, 1\] .*divide uint8 images by 255"),
    (lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), y),
     r"images must be in \[0, 1\]"),
])
def test_points_outside_the_documented_domain_are_refused_before_any_attack(change, message):
  """Labels of another model (12 on 10 classes), uint8-scaled images or NaN pixels would give an
  accuracy that means nothing; each is one ValueError line, before any program is compiled."""
  _, x, y, logits_fn = _linear_problem()
  bad_x, bad_y = change(np.asarray(x), np.asarray(y))
  compiled = []
  listener = lambda event, *_, **__: compiled.append(event)  # noqa: E731
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    with pytest.raises(ValueError, match=message) as raised:
      autoattack.evaluate(logits_fn, bad_x, bad_y, EPS, "apgd-ce", progress=False)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert "\n" not in str(raised.value)
  assert not [e for e in compiled if "backend_compile" in e]


def test_probabilities_are_flagged():
  _, x, y, logits_fn = _linear_problem()
  probs = lambda z: jax.nn.softmax(logits_fn(z))  # noqa: E731
  res = autoattack.evaluate(probs, x[:8], y[:8], EPS, "apgd-ce", progress=False, apgd_steps=2)
  assert any("look like probabilities" in m for m in res.warnings)
  clean = autoattack.evaluate(logits_fn, x[:8], y[:8], EPS, "apgd-ce", progress=False,
                              apgd_steps=2)
  assert clean.warnings == []


def test_randomised_models_are_flagged_unless_the_rand_version_runs():
  w, x, y, _ = _linear_problem(n=8)
  noisy = lambda z, key: (z.reshape(z.shape[0], -1) @ w  # noqa: E731
                          + 0.1 * jax.random.normal(key, (z.shape[0], w.shape[1])))
  res = autoattack.evaluate(noisy, x, y, EPS, "apgd-ce", progress=False, apgd_steps=2,
                            randomized=True)
  assert any("randomised" in m for m in res.warnings)
  res = autoattack.evaluate(noisy, x, y, EPS, "rand", progress=False, apgd_steps=2, eot_iter=2,
                            randomized=True)
  assert not any("randomised" in m for m in res.warnings)


def test_the_calling_convention_is_what_randomized_says():
  """Never guessed from the signature: a partial of a flax model's apply (which takes any
  arguments; a key would land in `train`) is called as logits_fn(x), like a lambda."""
  import functools

  import flax.linen as nn

  class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      h = nn.Conv(4, (3, 3))(x)
      h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
      return nn.Dense(5)(h.reshape(h.shape[0], -1))

  rng = np.random.default_rng(0)
  x = rng.uniform(size=(12, 6, 6, 1)).astype(np.float32)
  model = BNNet()
  variables = model.init(jax.random.key(0), x[:2])
  y = np.asarray(np.argmax(model.apply(variables, x), -1))
  run = lambda fn: autoattack.evaluate(fn, x, y, EPS, "apgd-ce,square", progress=False,  # noqa
                                       apgd_steps=3, square_queries=20)
  via_partial = run(functools.partial(model.apply, variables))
  via_lambda = run(lambda z: model.apply(variables, z))
  np.testing.assert_array_equal(via_partial.robust, via_lambda.robust)
  np.testing.assert_array_equal(via_partial.x_adv, via_lambda.x_adv)
  assert 0 < np.sum(via_partial.robust) < np.sum(via_partial.clean)  # a real attack ran

  w, x, y, logits_fn = _linear_problem(n=8)
  keyed = lambda z, key: logits_fn(z)  # noqa: E731
  with pytest.raises(ValueError, match="pass randomized=True") as e:
    autoattack.evaluate(keyed, x, y, EPS, "apgd-ce", progress=False)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="pass randomized=False"):
    autoattack.evaluate(logits_fn, x, y, EPS, "apgd-ce", progress=False, randomized=True)
  broken = lambda z: z.reshape(z.shape[0], -1) @ w[:5]  # noqa: E731  (a bug of its own)
  with pytest.raises(TypeError):
    autoattack.evaluate(broken, x, y, EPS, "apgd-ce", progress=False)


def test_apgd_checkpoints_follow_the_reference_rule():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), at 100 iterations.
  is_ckpt, window = apgd.checkpoint_schedule(100)
  assert list(np.flatnonzero(is_ckpt) + 1) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert list(window[is_ckpt]) == [22, 19, 16, 13, 10, 7, 6, 6]


def test_apgd_halves_the_step_when_the_loss_stalls():
  """A loss that is flat in x never increases: every checkpoint halves every step size."""
  x = jnp.full((3, 2, 2, 1), 0.5)
  y = jnp.zeros(3, jnp.int32)
  const = lambda z, key: jnp.tile(jnp.array([[1.0, 0.0, 0.0, 0.0]]), (z.shape[0], 1))  # noqa
  grad_fn = apgd.gradient_fn(const, apgd.loss_for("ce", y), 1, jax.random.key(0))
  keys = jax.random.split(jax.random.key(0), 3)
  s = apgd.init(grad_fn, x, y, keys, 0.1, 100)
  for i in range(100):
    s = apgd.body(grad_fn, x, y, 0.1, i, s)
  np.testing.assert_allclose(s["step"], 0.2 / 2 ** 8)


def test_dlr_losses_match_their_formulas():
  z = np.array([[3.0, 1.0, 2.0, -1.0, 0.5], [0.1, 0.4, 0.3, 0.2, 0.0]], np.float32)
  y = np.array([0, 2])
  s = np.sort(z, 1)
  want = [-(3.0 - 2.0) / (s[0, -1] - s[0, -3]), -(0.3 - 0.4) / (s[1, -1] - s[1, -3])]
  np.testing.assert_allclose(losses.dlr(jnp.asarray(z), jnp.asarray(y)), want, rtol=1e-6)
  t = np.asarray(losses.kth_class(jnp.asarray(z), 2))
  assert list(t) == [2, 2]  # the runner-up class
  want_t = [-(3.0 - 2.0) / (s[0, -1] - (s[0, -3] + s[0, -4]) / 2),
            -(0.3 - 0.3) / (s[1, -1] - (s[1, -3] + s[1, -4]) / 2)]
  np.testing.assert_allclose(losses.dlr_targeted(jnp.asarray(z), jnp.asarray(y),
                                                 jnp.asarray(t)), want_t, rtol=1e-6, atol=1e-7)


def test_linf_hyperplane_projection_is_minimal_and_feasible():
  rng = np.random.default_rng(0)
  n, d = 64, 30
  p = rng.uniform(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(n, d)).astype(np.float32)
  w[:, :3] = 0.0  # zero weights must not move
  b = np.sum(w * p, 1) + rng.normal(scale=6.0, size=n).astype(np.float32)
  dlt = np.asarray(fab.project_onto_hyperplane_linf(jnp.asarray(p), jnp.asarray(w), jnp.asarray(b)))
  assert np.all(dlt[:, :3] == 0) and np.all((p + dlt >= -1e-6) & (p + dlt <= 1 + 1e-6))
  lam = np.max(np.abs(dlt), 1)
  direction = np.sign(b - np.sum(w * p, 1))[:, None] * np.sign(w)
  room = np.where(direction > 0, 1 - p, p)
  reach = lambda r: np.sum(np.abs(w) * np.minimum(r[:, None], room), 1)  # noqa: E731
  need = np.abs(b - np.sum(w * p, 1))
  hit = reach(np.full(n, np.inf)) >= need
  assert 10 < hit.sum() < n  # both reachable and unreachable hyperplanes occur
  np.testing.assert_allclose(np.sum(w * (p + dlt), 1)[hit], b[hit], rtol=1e-4, atol=1e-4)
  assert np.all(reach(lam * (1 - 1e-3))[hit] < need[hit])  # no smaller radius reaches it
  np.testing.assert_allclose(dlt[~hit], (direction * room)[~hit], atol=1e-6)  # box corner


def test_square_schedule_and_squares():
  p = [float(square.square_fraction(jnp.int32(i), 5000)) for i in (0, 5, 6, 25, 26, 4999)]
  assert p == pytest.approx([0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 512])
  # One iteration changes one square per example, to x +- eps per channel.
  x = jnp.full((4, 8, 8, 2), 0.5)
  y = jnp.zeros(4, jnp.int32)
  keys = jax.random.split(jax.random.key(3), 4)
  always_better = lambda z, key: jnp.stack(  # noqa: E731  margin falls with every change
      [-jnp.sum(jnp.abs(z - 0.5), (1, 2, 3)), jnp.zeros(z.shape[0])], 1)
  model_key = jax.random.key(0)
  s = square.init(always_better, x, y, keys, 0.1, model_key)
  s["x_best"], s["margin"] = x, jnp.ones(4)
  s = square.body(always_better, x, y, keys, 0.1, jnp.int32(100), s, model_key, 5000)
  changed = np.abs(np.asarray(s["x_best"]) - 0.5) > 1e-6
  side = max(int(round(np.sqrt(0.8 / 4 * 64))), 1)  # iteration 100 of 5000 = 200 of 10 000
  assert list(changed.sum((1, 2, 3))) == [side * side * 2] * 4
  assert np.allclose(np.abs(np.asarray(s["x_best"])[changed] - 0.5), 0.1)


def test_results_do_not_depend_on_the_device_count():
  assert jax.local_device_count() >= 8
  w, x, y, logits_fn = _linear_problem(n=37)
  # The attacks with randomness (random starts, squares) and targets; FAB-T has none.
  run = lambda devices, batch: autoattack.AutoAttack(  # noqa: E731
      lambda _, z, key: logits_fn(z), 5, EPS, "apgd-t,square", square_queries=200,
      batch_size=batch, devices=devices, progress=False).run((), x, y, seed=3)
  one = run(jax.local_devices()[:1], 500)
  eight = run(jax.local_devices()[:8], 16)
  np.testing.assert_array_equal(one.robust, eight.robust)
  np.testing.assert_array_equal(one.broken_by, eight.broken_by)
  np.testing.assert_allclose(one.x_adv, eight.x_adv, atol=1e-6)
  assert [r.robust_after for r in one.records] == [r.robust_after for r in eight.records]


def test_summary_fields():
  _, x, y, logits_fn = _linear_problem(n=12)
  res = autoattack.evaluate(logits_fn, x, y, EPS, "apgd-ce,square", progress=False,
                            square_queries=50)
  s = res.summary()
  assert s["autoattack_acc"] == pytest.approx(np.mean(res.robust))
  assert list(s["autoattack_robust_counts"]) == ["apgd-ce", "square"]
  assert s["autoattack_robust_counts"]["square"] == int(res.robust.sum())
  assert s["autoattack_n"] == 12 and set(s["autoattack_seconds"]) == {"apgd-ce", "square"}
