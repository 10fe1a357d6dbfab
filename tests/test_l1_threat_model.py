"""The L1 threat model (autoattack/l1_ball.py, autoattack/apgd_l1.py): the projection against an
independent float64 solver, the sparse step against hand-worked cases, L1-APGD against the
closed form of a linear model, and AutoAttack's L1 runs against the device count and batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import autoattack
from fastadv_jax.autoattack import apgd_l1, l1_ball


def _projection_by_bisection(x: np.ndarray, d: np.ndarray, eps: float) -> np.ndarray:
  """Independent float64 solver: the KKT form p = sign(d) clip(|d| - lam, 0, room), with lam
  found by bisection on the (monotone) L1 norm of p."""
  x, d = x.astype(np.float64).ravel(), d.astype(np.float64).ravel()
  room = np.where(d > 0, 1.0 - x, x)
  p_of = lambda lam: np.sign(d) * np.clip(np.abs(d) - lam, 0.0, room)  # noqa: E731
  if np.abs(p_of(0.0)).sum() <= eps:
    return p_of(0.0)
  lo, hi = 0.0, float(np.abs(d).max())
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if np.abs(p_of(mid)).sum() > eps else (lo, mid)
  return p_of(hi)


@pytest.mark.parametrize("scale,eps", [(0.05, 5.0), (1.0, 3.0), (1.0, 0.5), (3.0, 40.0),
                                       (0.3, 100.0)])
def test_the_projection_is_the_closest_point_of_the_ball_and_the_box(scale, eps):
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
  x[:, :2] = np.round(x[:, :2])  # pixels at the box's faces, where it binds
  d = (scale * rng.standard_normal(x.shape)).astype(np.float32)
  d[1] = 0.0  # nothing to project
  d[2, :, :, :2] = 0.0  # sparse
  p = np.asarray(jax.jit(l1_ball.project)(jnp.asarray(x), jnp.asarray(d), eps))
  for i in range(len(x)):
    want = _projection_by_bisection(x[i], d[i], eps).reshape(x[i].shape)
    np.testing.assert_allclose(p[i], want, atol=2e-5 * max(1.0, scale), rtol=0)
    # in the ball up to float32 rounding of a sum of 192 terms (2^-20 relative)
    assert np.abs(p[i]).sum(dtype=np.float64) <= eps * (1 + 2.0**-20)
    assert np.all(x[i] + p[i] >= 0) and np.all(x[i] + p[i] <= 1)
  np.testing.assert_array_equal(p[1], 0.0)


def test_a_perturbation_inside_already_is_kept_and_per_example_radii_apply():
  x = jnp.full((2, 4), 0.5)
  d = jnp.asarray([[0.1, -0.2, 0.0, 0.3], [0.1, -0.2, 0.0, 0.3]])
  p = l1_ball.project(x, d, jnp.asarray([1.0, 0.3]))
  np.testing.assert_allclose(p[0], d[0], atol=1e-7)
  # 0.6 of mass over a radius of 0.3: lam = 0.1 shrinks 0.1 to 0, 0.2 to 0.1, 0.3 to 0.2
  np.testing.assert_allclose(p[1], [0.0, -0.1, 0.0, 0.2], atol=1e-6)


def test_the_sparse_direction_keeps_the_largest_entries_with_ties():
  g = jnp.asarray([[3.0, -1.0, 2.0, 0.5], [1.0, -1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  topk = jnp.asarray([0.5, 0.25, 0.5])
  out = np.asarray(l1_ball.sparse_direction(g, topk))
  np.testing.assert_allclose(out[0], [0.5, 0.0, 0.5, 0.0])
  np.testing.assert_allclose(out[1], [1 / 3, -1 / 3, 1 / 3, 0.0], rtol=1e-6)  # three tie at 1
  np.testing.assert_array_equal(out[2], 0.0)
  assert np.allclose(np.abs(out[:2]).sum(1), 1.0)


def test_the_large_radius_schedule_is_the_references():
  assert apgd_l1.stage_lengths(100) == (30, 30, 40)
  plan = apgd_l1.schedule(100)
  assert apgd_l1.evaluations(100) == len(plan["stage"]) == 102
  assert list(np.flatnonzero(plan["start"])) == [30, 61]
  assert plan["check"].sum() == 100  # k = 1 in stages of 30 and 40: after every iteration
  plan = apgd_l1.schedule(250)  # stages 75, 75, 100: k = 3, 3, 4
  assert plan["check"].sum() == 25 + 25 + 25


def _knapsack_distance(x: np.ndarray, w: np.ndarray, margin: float) -> float:
  """The smallest L1 norm of a perturbation d with x + d in [0, 1] and w . d <= -margin
  (margin > 0): a fractional knapsack, the largest |w_i| first, each up to its room."""
  room = np.where(w < 0, 1.0 - x, x)  # moving against sign(w) lowers w . (x + d)
  gain = np.abs(w)
  need, cost = margin, 0.0
  for i in np.argsort(-gain):
    if need <= 0:
      break
    take = min(room[i], need / gain[i]) if gain[i] > 0 else 0.0
    need -= take * gain[i]
    cost += take
  return cost if need <= 1e-12 else np.inf


def test_l1_apgd_breaks_a_linear_model_exactly_where_the_closed_form_says():
  """Two classes, logits (0, w . x + b): the minimal box-constrained L1 distance to the boundary
  of each point is a fractional knapsack; APGD-CE under L1 breaks the points whose distance is
  clearly below eps and none whose distance is above it (it cannot: every iterate lies in the
  ball)."""
  rng = np.random.default_rng(3)
  d = 6 * 6 * 1
  w = rng.standard_normal(d).astype(np.float32)
  x = rng.uniform(0, 1, (40, 6, 6, 1)).astype(np.float32)
  x[:, :2] = np.round(x[:, :2])
  flat = x.reshape(40, -1)
  b = -flat @ w + rng.uniform(0.2, 3.0, 40).astype(np.float32)  # class 1 by a margin
  y = np.ones(40, np.int32)
  wj, bj = jnp.asarray(w), jnp.asarray(b)
  margins = flat @ w  # the model's score without the per-point offset b
  eps = 0.6
  dist = np.asarray([_knapsack_distance(flat[i], w, float(margins[i] + b[i]))
                     for i in range(40)])
  clear = (dist < 0.9 * eps) | (dist > 1.1 * eps)
  assert clear.sum() >= 25 and (dist < 0.9 * eps).sum() >= 8 and (dist > 1.1 * eps).sum() >= 8

  def logits_fn(z, _key):  # each point with its own offset b
    s = z.reshape(z.shape[0], -1) @ wj + bj
    return jnp.stack([jnp.zeros_like(s), s], -1)

  keys = jax.random.split(jax.random.key(1), 40)
  loss = autoattack.apgd.loss_for("ce", jnp.asarray(y))
  robust, x_adv = jax.jit(lambda xx: autoattack.apgd.apgd(
      logits_fn, loss, xx, jnp.asarray(y), keys, eps, steps=100, norm="L1"))(jnp.asarray(x))
  robust, x_adv = np.asarray(robust), np.asarray(x_adv)
  np.testing.assert_array_equal(robust[clear], (dist >= eps)[clear])
  broken = ~robust
  size = np.abs(x_adv - x).reshape(40, -1).sum(1, dtype=np.float64)
  assert np.all(size[broken] <= eps * (1 + 2.0**-20)) and np.all(x_adv >= 0) and np.all(x_adv <= 1)
  s = x_adv.reshape(40, -1) @ w + b
  assert np.all(s[broken] < 0)  # really misclassified


def test_standard_under_l1_is_refused_in_one_line_naming_the_attack():
  with pytest.raises(ValueError, match="attack 'fab-t' does not implement the L1 threat model"):
    autoattack.AutoAttack(lambda v, x, k: x.reshape(x.shape[0], -1)[:, :10], 10, 12.0,
                          "standard", norm="L1")
  with pytest.raises(ValueError, match="the rand version under L1"):
    autoattack.AutoAttack(lambda v, x, k: x.reshape(x.shape[0], -1)[:, :10], 10, 12.0,
                          "rand", norm="L1")
  with pytest.raises(ValueError, match="the L1 norm of the perturbation"):
    autoattack.AutoAttack(lambda v, x, k: x.reshape(x.shape[0], -1)[:, :10], 10, -1.0,
                          "apgd-ce", norm="L1")
  aa = autoattack.AutoAttack(lambda v, x, k: x.reshape(x.shape[0], -1)[:, :10], 10, 12.0,
                             "apgd-ce,apgd-t", norm="L1")
  assert aa.restarts == {"apgd-ce": 5, "apgd-t": 1} and aa.n_targets == 5


def _multiclass_problem(n=37, seed=0):
  """A 5-class linear model on 6 x 6 images, a third of the pixels at the box's faces; the
  minimal L1 distance to misclassification is the smallest pairwise knapsack (misclassified
  exactly when some other logit reaches the label's)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(36, 5)).astype(np.float32)
  x = rng.uniform(0, 1, size=(n, 6, 6, 1)).astype(np.float32)
  x[:, :2] = np.round(x[:, :2])
  flat = x.reshape(n, -1)
  y = np.argmax(flat @ w, -1).astype(np.int32)
  dist = np.asarray([min(_knapsack_distance(flat[i], w[:, y[i]] - w[:, j],
                                            float(flat[i] @ (w[:, y[i]] - w[:, j])))
                         for j in range(5) if j != y[i]) for i in range(n)])
  return w, x, y, dist


def test_autoattack_l1_runs_are_valid_and_the_same_on_any_device_count_and_batch():
  """APGD-CE and APGD-T under L1 through the runner, with the reference's L1 settings (5 runs, 5
  target classes; 3 iterations here, for the compile time): the per-point verdicts are the same
  on 1 device with one batch and on 8 devices in batches of 16; every point counted as broken is
  misclassified at an x_adv inside the ball and the box, so none whose exact distance is beyond
  eps, and most of those well inside it are broken."""
  assert jax.local_device_count() >= 8
  w, x, y, dist = _multiclass_problem()
  eps = float(np.median(dist))
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ jnp.asarray(w)  # noqa: E731
  run = lambda devices, batch: autoattack.AutoAttack(  # noqa: E731
      lambda _, z, key: logits_fn(z), 5, eps, "apgd-ce,apgd-t", apgd_steps=3,
      batch_size=batch, devices=devices, progress=False, norm="L1").run((), x, y, seed=3)
  one = run(jax.local_devices()[:1], 500)
  eight = run(jax.local_devices()[:8], 16)
  np.testing.assert_array_equal(one.robust, eight.robust)
  np.testing.assert_array_equal(one.broken_by, eight.broken_by)
  broken = ~one.robust
  assert np.all(np.abs(one.x_adv - x).reshape(len(x), -1).sum(1, dtype=np.float64)[broken]
                <= eps * (1 + 2.0**-20))
  assert np.all((one.x_adv >= 0) & (one.x_adv <= 1))
  assert np.all(np.argmax(np.asarray(logits_fn(jnp.asarray(one.x_adv))), -1)[broken]
                != y[broken])
  assert not np.any(broken & (dist >= eps))
  assert np.sum(broken & (dist < 0.5 * eps)) >= 0.8 * np.sum(dist < 0.5 * eps) > 0
  assert one.norm == "L1" and one.summary()["autoattack_norm"] == "L1"
