"""The L2 threat model: APGD, Square and PGD against a linear model's exact L2 worst case, the
ball and box constraints, batch independence, and `evaluate --norm=L2`."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MOCK_DATA_CLI, ROOT, tiny_config
from fastadv_jax import attacks, autoattack, evaluate, losses, models, randomness
from fastadv_jax.autoattack import square
from fastadv_jax.training import evaluation, train

PLUGINS = ROOT / "tests" / "plugins"


def _linear_problem(n=40, d=(6, 6, 1), k=5, seed=0):
  """Points well inside the box (in [0.35, 0.65]), so that at the radii used the closest point
  of the decision boundary is inside [0, 1] (checked by _distance) and only the ball binds."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(int(np.prod(d)), k)).astype(np.float32)
  x = rng.uniform(0.35, 0.65, size=(n,) + d).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
  y = np.asarray(np.argmax(logits_fn(x), -1))
  return w, x, y, logits_fn


def _distance(w, x, y):
  """The exact L2 distance from each point to its decision boundary, min_j margin_j / ||w_y -
  w_j||, and whether the closest boundary point lies in [0, 1] (then it is the distance within
  the box too)."""
  xf = x.reshape(len(x), -1).astype(np.float64)
  z = xf @ w
  dist, inside = np.full(len(x), np.inf), np.ones(len(x), bool)
  for j in range(w.shape[1]):
    v = w[:, y].T - w[:, j][None]
    vn = np.linalg.norm(v, axis=1)
    m = z[np.arange(len(x)), y] - z[:, j]
    own = y == j
    dj = np.where(own, np.inf, m / np.where(own, 1.0, vn))
    closest = xf - np.where(own, 0.0, m / np.where(own, 1.0, vn) ** 2)[:, None] * v
    better = dj < dist
    inside = np.where(better, np.all((closest >= 0) & (closest <= 1), 1), inside)
    dist = np.minimum(dist, dj)
  return dist, inside


def _l2(v):
  return np.linalg.norm(np.asarray(v, np.float64).reshape(len(v), -1), axis=1)


def _check_adversarial(res, x, y, logits_fn, eps):
  """Every x_adv is in the L2 ball (up to float32 rounding) and the box; every point counted as
  broken is misclassified there."""
  assert np.all(_l2(res.x_adv - x) <= eps * (1 + 1e-5))
  assert np.all((res.x_adv >= 0) & (res.x_adv <= 1))
  broken = ~res.robust & res.clean
  assert np.all(np.argmax(logits_fn(res.x_adv[broken]), -1) != y[broken])


@pytest.mark.parametrize("attacks_, k", [("apgd-ce", 2), ("apgd-t", 5), ("apgd-ce,apgd-dlr", 5)])
def test_apgd_l2_matches_the_exact_worst_case(attacks_, k):
  w, x, y, logits_fn = _linear_problem(k=k)
  dist, inside = _distance(w, x, y)
  eps = float(np.median(dist))  # half the points are within eps of the boundary
  assert np.all(inside[dist < eps])  # the box does not bind: the distance is the worst case
  res = autoattack.evaluate(logits_fn, x, y, eps, attacks_, progress=False, norm="L2")
  assert res.norm == "L2" and res.summary()["autoattack_norm"] == "L2"
  _check_adversarial(res, x, y, logits_fn, eps)
  clear = np.abs(dist - eps) > 0.01 * eps
  assert 0 < np.sum(dist[clear] < eps) < np.sum(clear)
  np.testing.assert_array_equal(res.robust[clear], dist[clear] >= eps)


def test_l2_results_do_not_depend_on_the_batch_or_device_count():
  assert jax.local_device_count() >= 8
  w, x, y, logits_fn = _linear_problem(n=37)
  eps = float(np.median(_distance(w, x, y)[0]))
  run = lambda devices, batch: autoattack.AutoAttack(  # noqa: E731
      lambda _, z, key: logits_fn(z), 5, eps, "apgd-ce,square", apgd_steps=20,
      square_queries=100, batch_size=batch, devices=devices, progress=False,
      norm="L2").run((), x, y, seed=3)
  one = run(jax.local_devices()[:1], 500)
  eight = run(jax.local_devices()[:8], 16)
  np.testing.assert_array_equal(one.robust, eight.robust)
  np.testing.assert_array_equal(one.broken_by, eight.broken_by)
  # Not bit for bit: XLA rounds a matmul differently at different batch shapes, and the L2 step
  # keeps the gradient's size (L-inf's sign step absorbs such differences).
  np.testing.assert_allclose(one.x_adv, eight.x_adv, atol=1e-4)
  # Square's own start and windows, without APGD: a point's result is its own.
  alone = lambda idx: square.square(  # noqa: E731
      lambda z, key: logits_fn(z), jnp.asarray(x[idx]), jnp.asarray(y[idx]),
      randomness.example_keys(jax.random.key(0), jnp.asarray(idx)), eps, 30, norm="L2")
  whole, part = alone(np.arange(37)), alone(np.arange(5, 20))
  np.testing.assert_array_equal(whole[0][5:20], part[0])
  np.testing.assert_allclose(whole[1][5:20], part[1], atol=1e-5)


def test_square_l2_breaks_what_masked_gradients_hide():
  w, x, y, _ = _linear_problem(n=24, d=(10, 10, 1), seed=1)
  masked = lambda z: jax.lax.stop_gradient(z).reshape(z.shape[0], -1) @ w  # noqa: E731
  dist, inside = _distance(w, x, y)
  eps = 2.0 * float(np.quantile(dist, 0.75))
  near = dist < eps / 2  # well inside the ball: a random search must find these
  assert np.sum(near) >= 12 and np.all(inside[dist < eps])
  apgd_only = autoattack.evaluate(masked, x, y, eps, "apgd-ce", progress=False, norm="L2")
  assert any("gradient of exactly zero" in m for m in apgd_only.warnings)
  res = autoattack.evaluate(masked, x, y, eps, "apgd-ce,square", progress=False, norm="L2",
                            square_queries=1000)
  _check_adversarial(res, x, y, masked, eps)
  assert np.sum(res.robust[near]) <= 1  # all but at most one of them
  assert np.all(res.robust[dist >= eps])  # and nothing beyond the ball (the closed form)
  assert np.sum(res.broken_by == 1) > np.sum(res.broken_by == 0)


def test_square_l2_schedule_and_step_keep_the_budget():
  # The reference's side: round(sqrt(p h w)), at least 3, made odd, for p = 0.8 / 2^k on 28x28:
  # sqrt(627.2) = 25.04, sqrt(313.6) = 17.7 -> 18 -> 19, 12.5 -> 13, 8.85 -> 9, 6.26 -> 7,
  # 4.43 -> 5, 3.13 -> 3, then 3.
  assert list(square.l2_sides(28, 28)) == [25, 19, 13, 9, 7, 5, 3, 3, 3, 3]
  for side in (1, 3, 5, 8):
    e = square.eta(side)
    assert e.shape == (side, side) and np.isclose(np.sum(e ** 2), 1.0, atol=1e-6)
    assert np.all(e[:side // 2] > 0) and np.all(e[side // 2:] < 0)  # the two halves
  # Far from the box, the start and every step put the perturbation on the sphere of radius eps.
  x = jnp.full((4, 12, 12, 2), 0.5)
  y = jnp.zeros(4, jnp.int32)
  keys = jax.random.split(jax.random.key(3), 4)
  always_better = lambda z, key: jnp.stack(  # noqa: E731  margin falls with every change
      [-jnp.sum(jnp.abs(z - 0.5), (1, 2, 3)), jnp.zeros(z.shape[0])], 1)
  s = square.init_l2(always_better, x, y, keys, 0.5, jax.random.key(0))
  np.testing.assert_allclose(_l2(s["x_best"] - x), 0.5, rtol=1e-5)
  for i in (0, 400):
    s["margin"], before = jnp.ones(4), s["x_best"]
    s = square.body_l2(always_better, x, y, keys, 0.5, jnp.int32(i), s, jax.random.key(0), 1000)
    assert np.all(np.any(np.asarray(s["x_best"] != before), (1, 2, 3)))  # taken
    np.testing.assert_allclose(_l2(s["x_best"] - x), 0.5, rtol=1e-5)


def test_pgd_l2_linear_worst_case_is_eps_along_w():
  """For loss = -y*w.x, the L2 worst case is -eps * y * w / ||w||."""
  w = jax.random.normal(jax.random.key(0), (6, 6, 1))
  x = jnp.full((3, 6, 6, 1), 0.5)  # far from the box: only the ball binds
  y = jnp.array([1.0, -1.0, 1.0])
  loss_fn = lambda z: -y * jnp.sum(z * w, axis=(1, 2, 3))  # noqa: E731
  eps = 0.3
  expected = -eps * w[None] / jnp.linalg.norm(w) * y[:, None, None, None]
  keys = jax.random.split(jax.random.key(1), 3)
  delta0 = attacks.init_delta("uniform", keys, x, eps, "L2")
  delta = attacks.pgd(loss_fn, x, eps, eps / 4, 60, delta0, norm="L2")
  np.testing.assert_allclose(delta, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["uniform", "zero"])
def test_pgd_l2_respects_the_ball_and_box(kind):
  model = models.SmallCNN(num_classes=10, width=4, use_batch_norm=True)
  x = jax.random.uniform(jax.random.key(0), (16, 12, 12, 1))
  x = x.at[:, :3].set(0.0).at[:, -3:].set(1.0)  # pixels on both box boundaries
  v = model.init(jax.random.key(1), x, train=False)
  y = jnp.argmax(model.apply(v, x, train=False), -1)
  loss_fn = lambda z: losses.cross_entropy(model.apply(v, z, train=False), y)  # noqa
  eps = 1.5  # an L2 radius above 1 is legitimate
  keys = jax.random.split(jax.random.key(3), 16)
  delta0 = attacks.init_delta(kind, keys, x, eps, "L2")
  delta = attacks.pgd(loss_fn, x, eps, eps / 4, 5, delta0, norm="L2")
  for d in (delta0, delta):
    assert np.all(_l2(d) <= eps * (1 + 1e-6))
    assert float(jnp.min(x + d)) >= 0.0 and float(jnp.max(x + d)) <= 1.0
  assert np.all(_l2(delta) > 0.5 * eps)  # it moved (the box only trims)
  if kind == "uniform":  # random directions and radii in (0, eps)
    assert len(np.unique(np.round(_l2(delta0), 4))) == 16
  with pytest.raises(ValueError, match="L-inf only"):
    attacks.init_delta("corner", keys, x, eps, "L2")


def test_pgd_l2_breaks_exactly_the_points_within_eps():
  w, x, y, logits_fn = _linear_problem(n=40, k=2)  # two classes: CE's gradient is w_j - w_y
  dist, inside = _distance(w, x, y)
  eps = float(np.median(dist))
  assert np.all(inside[dist < eps])
  loss_and_logits = lambda z: (losses.cross_entropy(logits_fn(z), y),  # noqa: E731
                               logits_fn(z))
  keys = randomness.example_keys(jax.random.key(0), jnp.arange(40))
  robust, delta = attacks.pgd_with_restarts(loss_and_logits, jnp.asarray(x), jnp.asarray(y),
                                            keys, eps, eps / 4, 50, 2, norm="L2")
  assert np.all(_l2(delta) <= eps * (1 + 1e-6))
  clear = np.abs(dist - eps) > 0.01 * eps
  np.testing.assert_array_equal(np.asarray(robust)[clear], dist[clear] >= eps)


def test_l2_evaluator_matches_the_pure_attack_on_any_device_count():
  model = models.SmallCNN(num_classes=10, width=4, use_batch_norm=True)
  x = jax.random.uniform(jax.random.key(0), (16, 12, 12, 1))
  v = model.init(jax.random.key(1), x, train=False)
  xu = np.asarray(x * 255, np.uint8)
  xf = xu.astype(np.float32) / 255
  y = np.asarray(jnp.argmax(model.apply(v, xf, train=False), -1))
  rng = jax.random.key(5)
  eps = 0.5
  one = evaluation.Evaluator(model, batch_size=16, devices=jax.local_devices()[:1], norm="L2")
  many = evaluation.Evaluator(model, batch_size=8, devices=jax.local_devices()[:8], norm="L2")
  acc1 = one.robust_accuracy(v, xu, y, eps, 3, 2, rng)
  acc8 = many.robust_accuracy(v, xu, y, eps, 3, 2, rng)
  keys = randomness.example_keys(rng, jnp.arange(16))
  loss_and_logits = lambda z: (losses.cross_entropy(  # noqa: E731
      model.apply(v, z, train=False), y), model.apply(v, z, train=False))
  robust, _ = attacks.pgd_with_restarts(loss_and_logits, jnp.asarray(xf), jnp.asarray(y), keys,
                                        eps, eps / 4, 3, 2, norm="L2")
  assert acc1 == acc8 == pytest.approx(float(jnp.mean(robust)))
  with pytest.raises(ValueError, match="L-inf only"):
    one.diagnostics(v, xu, y, eps, rng)
  with pytest.raises(ValueError, match="norm must be one of"):
    evaluation.Evaluator(model, norm="L3")
  with pytest.raises(ValueError, match="norm must be one of"):  # L1: AutoAttack only, no PGD
    evaluation.Evaluator(model, norm="L1").robust_accuracy(v, xu, y, 4.0, 3, 1, rng)


def test_evaluate_flags_per_norm():
  assert evaluate.check_flags(1.5, 16, 3, 1, "pgd,apgd-ce", "L2") == (True, ("apgd-ce",))
  for eps, norm, match in ((1.5, "Linf", "must be in \\[0, 1\\]"), (0.0, "L2", "must be > 0"),
                           (float("nan"), "L2", "must be a finite number, got nan"),
                           (float("inf"), "L2", "must be a finite number, got inf")):
    with pytest.raises(evaluate.UsageError, match=match):
      evaluate.check_flags(eps, 16, 3, 1, "pgd", norm)
  name = evaluate.output_name("last", 0.1, 16, True, ("apgd-ce",), 50, 10)
  assert name == "eval_last_eps0.1000_n16_pgd50x10+aa-apgd-ce.json"  # L-inf: as before
  assert evaluate.output_name("last", 0.1, 16, True, ("apgd-ce",), 50, 10, "L2") == (
      "eval_last_L2_eps0.1000_n16_pgd50x10+aa-apgd-ce.json")
  # every setting that changes the numbers, away from its default, is in the name
  defaults = dict(evaluate.AA_DEFAULTS)
  assert evaluate.output_name("last", 0.1, 16, True, ("apgd-ce",), 50, 10, "Linf", 0,
                              defaults) == name
  assert evaluate.output_name("last", 0.1, 16, True, ("apgd-ce",), 50, 10, "Linf", 3,
                              dict(defaults, apgd_steps=20, square_queries=100)) == (
      "eval_last_eps0.1000_n16_pgd50x10+aa-apgd-ce-apgd20_seed3.json")  # no Square run
  assert evaluate.output_name("last", 0.1, 16, True, (), 50, 10, "Linf", 1) == (
      "eval_last_eps0.1000_n16_pgd50x10_seed1.json")
  # a budget of attacks that do not run changes nothing, so it is not in the name
  assert evaluate.output_name("last", 0.1, 16, False, ("apgd-ce",), 50, 10, "Linf", 0,
                              dict(defaults, fab_steps=5)) == (
      "eval_last_eps0.1000_n16_aa-apgd-ce.json")


def test_evaluate_command_with_norm_l2_and_l1(tmp_path, mock_fashion_mnist):
  train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))
  plain = [sys.executable, "-m", "fastadv_jax.evaluate", f"--workdir={tmp_path}", "--n_eval=16",
           "--norm=L2"]
  # Refusals: one line each, before any data is read.
  for extra, message in (([], "--eps: give the L2 radius"),
                         (["--eps=0"], "--eps: the L2 radius must be > 0"),
                         (["--eps=1", "--plugins=my_attack", "--attack=apgd-ce,my-attack"],
                          "--attack: my-attack does not implement the L2 threat model yet; run "
                          "the others with --attack=apgd-ce")):
    proc = subprocess.run(plain + extra, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  proc = subprocess.run(
      [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.evaluate", f"--workdir={tmp_path}",
       "--n_eval=16", "--norm=L2", "--eps=1.5", "--attack=pgd,apgd-ce,square",
       "--pgd_steps=3", "--pgd_restarts=1"],
      capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  name = "eval_last_L2_eps1.5000_n16_pgd3x1+aa-apgd-ce+square"
  out = json.loads((tmp_path / f"{name}.json").read_text())
  assert out["norm"] == "L2" and out["autoattack_norm"] == "L2" and out["eps"] == 1.5
  assert out["autoattack_acc"] <= out["clean_acc"] and out["pgd_acc"] <= out["clean_acc"]
  assert list(out["autoattack_robust_counts"]) == ["apgd-ce", "square"]
  points = np.load(tmp_path / f"{name}.npz")
  assert points["autoattack_robust"].mean() == out["autoattack_acc"]
  # L1 (tests/test_l1_threat_model.py has the attack's own tests): pgd and the standard version
  # are refused in one line; L1-APGD runs with the reference's L1 settings.
  for extra, message in ((["--eps=12", "--attack=pgd,apgd-ce"],
                          "--attack: pgd has no L1 version; run L1-APGD with "
                          "--attack=apgd-ce,apgd-t"),
                         (["--eps=12", "--attack=autoattack"],
                          "--attack: fab-t, square do not implement the L1 threat model yet; run "
                          "the others with --attack=apgd-ce,apgd-t")):
    proc = subprocess.run(plain[:-1] + ["--norm=L1"] + extra, capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  proc = subprocess.run(
      [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.evaluate", f"--workdir={tmp_path}",
       "--n_eval=16", "--norm=L1", "--eps=4", "--attack=apgd-ce,apgd-t", "--apgd_steps=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  name = "eval_last_L1_eps4.0000_n16_aa-apgd-ce+apgd-t-apgd3"
  out = json.loads((tmp_path / f"{name}.json").read_text())
  assert out["norm"] == "L1" and out["autoattack_norm"] == "L1" and out["eps"] == 4.0
  assert out["autoattack_acc"] <= out["clean_acc"]
  assert list(out["autoattack_robust_counts"]) == ["apgd-ce", "apgd-t"]
