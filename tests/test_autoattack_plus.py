"""AutoAttack's L2 FAB, untargeted FAB, restarts and the plus version: the L2 hyperplane
projection against an independent solver, FAB on linear models whose answer is known, restarts
and plus never weaker than what they extend, and the names and refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import autoattack, evaluate
from fastadv_jax.autoattack import fab
from fastadv_jax.training import evaluation

from test_autoattack import _exact_worst_margin


def _l2_projection_by_bisection(p, w, b, iters=200):
  """The smallest-L2 d with <w, p + d> = b inside the box, by the KKT conditions solved by
  bisection in float64 (independent of the sorting solver): d(lam) = clip(lam * s * w) to the
  box, and s <w, d(lam)> grows with lam. None where the hyperplane is out of the box's reach."""
  p, w = p.astype(np.float64), w.astype(np.float64)
  c = b.astype(np.float64) - np.sum(w * p, 1)
  s = np.sign(c)[:, None]
  lo, hi = -p, 1 - p
  d_of = lambda lam: np.clip(lam[:, None] * s * w, lo, hi)  # noqa: E731
  reach = lambda lam: np.sum(s * w * d_of(lam), 1)  # noqa: E731
  ok = reach(np.full(len(p), 1e12)) >= np.abs(c)
  a, z = np.zeros(len(p)), np.full(len(p), 1e6)
  for _ in range(iters):
    m = (a + z) / 2
    low = reach(m) < np.abs(c)
    a, z = np.where(low, m, a), np.where(low, z, m)
  return d_of(z), ok


def test_l2_hyperplane_projection_is_minimal_and_feasible():
  rng = np.random.default_rng(0)
  n, d = 96, 20
  p = rng.uniform(size=(n, d)).astype(np.float32)
  p[:8, 5] = 0.0  # points on a box face
  w = rng.normal(size=(n, d)).astype(np.float32)
  w[:, :3] = 0.0  # zero weights must not move
  b = np.sum(w * p, 1) + rng.normal(scale=4.0, size=n).astype(np.float32)
  b[-6:] = np.sum(w[-6:] * p[-6:], 1) + 1e-3  # near the point: the box does not bind
  dlt = np.asarray(fab.project_onto_hyperplane_l2(jnp.asarray(p), jnp.asarray(w),
                                                  jnp.asarray(b)))
  assert np.all(np.isfinite(dlt))
  assert np.all(dlt[:, :3] == 0) and np.all((p + dlt >= -1e-6) & (p + dlt <= 1 + 1e-6))
  want, ok = _l2_projection_by_bisection(p, w, b)
  assert 10 < ok.sum() < n  # both reachable and unreachable hyperplanes occur
  np.testing.assert_allclose(np.sum(w * (p + dlt), 1)[ok], b[ok], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dlt[ok], want[ok], atol=2e-5)
  # Out of reach: the box corner in the direction that helps (as the reference).
  corner = np.where(np.sign(b - np.sum(w * p, 1))[:, None] * w > 0, 1 - p, -p) * (w != 0)
  np.testing.assert_allclose(dlt[~ok], corner[~ok], atol=1e-6)
  # Away from the box the closed form c w / |w|^2.
  c = b[-6:] - np.sum(w[-6:] * p[-6:], 1)
  closed = c[:, None] * w[-6:] / np.sum(w[-6:] ** 2, 1, keepdims=True)
  np.testing.assert_allclose(dlt[-6:], closed, rtol=1e-3, atol=1e-7)


def _linear(n=40, d=(6, 6, 1), k=5, seed=0, low=0.0, high=1.0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(int(np.prod(d)), k)).astype(np.float32)
  x = rng.uniform(low, high, size=(n,) + d).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
  y = np.asarray(np.argmax(logits_fn(x), -1))
  return w, x, y, logits_fn


def _exact_l2_distance(w, x, y):
  """A linear model's smallest L2 perturbation inside [0, 1]^d that makes some class j reach
  y's logit: min over j of the box-constrained projection onto {z_y = z_j} (bisection)."""
  xf = x.reshape(len(x), -1)
  best = np.full(len(x), np.inf)
  for j in range(w.shape[1]):
    v = w[:, j][None] - w[:, y].T          # z_j - z_y = <v, x>
    dlt, ok = _l2_projection_by_bisection(xf, v, np.zeros(len(x), np.float32))
    dist = np.where(ok, np.sqrt(np.sum(dlt ** 2, 1)), np.inf)
    best = np.minimum(best, np.where(y == j, np.inf, dist))
  return best


def _assert_adversarial(res, x, y, logits_fn, eps, norm):
  broken = ~res.robust & res.clean
  delta = (res.x_adv[broken] - x[broken]).reshape(int(broken.sum()), -1)
  size = np.max(np.abs(delta), 1) if norm == "Linf" else np.sqrt(np.sum(delta ** 2, 1))
  assert np.all(size <= eps * (1 + 1e-5) + 1e-6)
  assert np.all((res.x_adv >= 0) & (res.x_adv <= 1))
  assert np.all(np.argmax(logits_fn(res.x_adv[broken]), -1) != y[broken])


@pytest.mark.parametrize("attack", ["fab-t", "fab"])
def test_l2_fab_matches_the_exact_minimal_distance(attack):
  w, x, y, logits_fn = _linear(n=48, low=0.1, high=0.9, seed=2)
  dist = _exact_l2_distance(w, x, y)
  eps = float(np.median(dist))
  res = autoattack.evaluate(logits_fn, x, y, eps, attack, progress=False, norm="L2")
  _assert_adversarial(res, x, y, logits_fn, eps, "L2")
  clear = np.abs(dist - eps) > 0.03 * eps
  assert 0 < np.sum(dist[clear] > eps) < np.sum(clear)  # both outcomes occur
  np.testing.assert_array_equal(res.robust[clear], dist[clear] > eps)


def test_untargeted_linf_fab_matches_the_exact_worst_case():
  w, x, y, logits_fn = _linear()
  eps = 0.03
  worst = _exact_worst_margin(w, x, y, eps)
  res = autoattack.evaluate(logits_fn, x, y, eps, "fab", progress=False)
  _assert_adversarial(res, x, y, logits_fn, eps, "Linf")
  clear = np.abs(worst) > 1e-3
  assert 0 < np.sum(worst[clear] > 0) < np.sum(clear)
  np.testing.assert_array_equal(res.robust[clear], worst[clear] > 0)


def test_untargeted_fab_linearises_the_closest_boundary_in_the_norm():
  """On a linear model every boundary is exact: FAB picks the class j minimising
  |z_j - z_y| / ||w_j - w_y||_dual (L1 for L-inf, L2 for L2), with its logit gap and gradient."""
  rng = np.random.default_rng(4)
  x = rng.uniform(size=(64, 6, 6, 1)).astype(np.float32)
  xf = x.reshape(len(x), -1)
  # Sparse and dense class weights, so that the L1 and L2 norms rank the boundaries differently.
  density = np.array([1.0, 0.08, 1.0, 0.15, 0.5, 0.08, 1.0, 0.3])
  w = (rng.normal(size=(36, 8)) * (rng.uniform(size=(36, 8)) < density)).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
  y = np.asarray(np.argmax(logits_fn(x), -1))
  gap = xf @ w - (xf @ w)[np.arange(len(x)), y][:, None]          # (n, K)
  v = w.T[None] - w.T[y][:, None]                                    # (n, K, D)
  picks = {}
  for norm, dual in (("Linf", np.sum(np.abs(v), 2)), ("L2", np.sqrt(np.sum(v ** 2, 2)))):
    dist = np.where(np.eye(8, dtype=bool)[y], np.inf, np.abs(gap) / (1e-12 + dual))
    j = np.argmin(dist, 1)
    d, g = fab._closest_plane(lambda z, key: logits_fn(z), jnp.asarray(xf), x.shape,
                              jnp.asarray(y), jax.random.key(0), norm)
    np.testing.assert_allclose(d, gap[np.arange(len(x)), j], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g, v[np.arange(len(x)), j], rtol=1e-5, atol=1e-5)
    picks[norm] = j
  assert np.any(picks["Linf"] != picks["L2"])  # the norms disagree somewhere


def test_fab_random_start_is_the_references():
  """Restart 0 starts at x; later ones at x + eps / 2 * t / |t| in the norm."""
  x = jnp.full((5, 4, 4, 3), 0.5)
  keys = jax.random.split(jax.random.key(1), 5)
  for norm, size in (("Linf", lambda v: jnp.max(jnp.abs(v), 1)),
                     ("L2", lambda v: jnp.sqrt(jnp.sum(v * v, 1)))):
    np.testing.assert_array_equal(fab.init(x, keys, 0.2, 0, norm)["x1"], x.reshape(5, -1))
    moved = fab.init(x, keys, 0.2, 1, norm)["x1"] - x.reshape(5, -1)
    np.testing.assert_allclose(size(moved), 0.1, rtol=1e-5)
    assert len({tuple(np.asarray(r)) for r in moved}) == 5  # every point its own start


def test_restart_zero_is_the_run_without_restarts_and_more_never_break_fewer():
  """With masked gradients APGD stays at its random start: each restart is a fresh draw."""
  w, x, y, _ = _linear(n=32, d=(10, 10, 1), seed=1)
  masked = lambda z: jax.lax.stop_gradient(z).reshape(z.shape[0], -1) @ w  # noqa: E731
  run = lambda **kw: autoattack.evaluate(masked, x, y, 0.06, "apgd-ce", progress=False,  # noqa
                                         apgd_steps=2, seed=5, **kw)
  once, again, four = run(), run(restarts={"apgd-ce": 1}), run(restarts={"apgd-ce": 4})
  np.testing.assert_array_equal(once.x_adv, again.x_adv)
  first = ~once.robust & once.clean
  assert np.all(~four.robust[first])
  np.testing.assert_array_equal(four.x_adv[first], once.x_adv[first])  # restart 0's keys
  assert np.sum(~four.robust) > np.sum(~once.robust)  # later restarts draw afresh
  assert four.records[0].attacked == once.records[0].attacked


def test_plus_is_never_weaker_than_standard_on_the_same_points():
  w, x, y, logits_fn = _linear(n=24, k=4, seed=3)
  kw = dict(progress=False, apgd_steps=3, fab_steps=3, square_queries=10, n_target_classes=2,
            seed=7)
  standard = autoattack.evaluate(logits_fn, x, y, 0.04, "standard", **kw)
  plus = autoattack.evaluate(logits_fn, x, y, 0.04, "plus", **kw)
  assert plus.attacks == autoattack.VERSIONS["plus"]
  assert [r.name for r in plus.records] == list(autoattack.VERSIONS["plus"])
  assert 0 < np.sum(plus.robust) and np.sum(standard.robust) < np.sum(standard.clean)
  assert np.all(standard.robust[plus.robust])  # plus's robust points are standard's
  # Both start with apgd-ce under the same keys: identical on what it broke in standard.
  first = standard.broken_by == 0
  assert first.any()
  assert np.all(plus.broken_by[first] == 0)
  np.testing.assert_array_equal(plus.x_adv[first], standard.x_adv[first])
  _assert_adversarial(plus, x, y, logits_fn, 0.04, "Linf")


def test_versions_restarts_and_names():
  assert autoattack.VERSIONS["plus"] == ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t",
                                         "fab-t")
  assert autoattack.parse_attacks("plus") == autoattack.VERSIONS["plus"]
  assert autoattack.check_restarts(autoattack.VERSIONS["plus"]) == {
      "apgd-ce": 5, "apgd-dlr": 5, "fab": 5, "square": 1, "apgd-t": 1, "fab-t": 1}
  assert set(autoattack.check_restarts(autoattack.VERSIONS["standard"]).values()) == {1}
  assert autoattack.check_restarts(["apgd-ce", "fab"], {"fab": 3}) == {"apgd-ce": 1, "fab": 3}
  for item, version in (("autoattack", "standard"), ("autoattack-rand", "rand"),
                        ("autoattack-plus", "plus")):
    run_pgd, attacks = evaluation.parse_attack_spec(item)
    assert not run_pgd and attacks == autoattack.VERSIONS[version]
    assert autoattack.version_of(attacks) == version
    name = evaluate.output_name("last", 0.1, 16, False, attacks, 50, 10)
    assert name.endswith(f"_aa-{version}.json")
  assert evaluation.parse_attack_spec("pgd,autoattack-plus")[1] == autoattack.VERSIONS["plus"]
  assert "aa-apgd-ce+fab" in evaluate.output_name("last", 0.1, 16, False, ("apgd-ce", "fab"),
                                                  50, 10)
  assert autoattack.get("fab").norms == autoattack.get("fab-t").norms == ("Linf", "L2")
  apply_fn = lambda _, z, key: z.reshape(z.shape[0], -1)[:, :5]  # noqa: E731
  built = autoattack.AutoAttack(apply_fn, 5, 0.03, "plus", restarts={"square": 2})
  assert built.version == "plus" and built.restarts["fab"] == 5 and built.restarts["square"] == 2
  assert autoattack.AutoAttack(apply_fn, 5, 0.03, "rand").version == "rand"


@pytest.mark.parametrize("restarts, needle", [
    ({"apgd-t": 2}, "'apgd-t' is not among the attacks run"),
    ({"apgd-ce": 0}, "must be an integer >= 1, got 0"),
    ({"apgd-ce": 1.5}, "must be an integer >= 1, got 1.5"),
    ({"apgd-ce": True}, "must be an integer >= 1, got True"),
])
def test_bad_restarts_are_one_line_errors(restarts, needle):
  _, x, y, logits_fn = _linear(n=4)
  with pytest.raises(ValueError, match=needle) as e:
    autoattack.evaluate(logits_fn, x, y, 0.03, "apgd-ce,square", restarts=restarts)
  assert "\n" not in str(e.value)


def test_an_attack_listed_twice_points_to_restarts():
  _, x, y, logits_fn = _linear(n=4)
  with pytest.raises(ValueError, match=r"listed twice.*restarts=\{'apgd-ce': 2\}"):
    autoattack.evaluate(logits_fn, x, y, 0.03, "apgd-ce,square,apgd-ce")
