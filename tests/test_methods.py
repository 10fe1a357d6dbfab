"""The fast-AT methods of the registry: closed-form cases on linear models, the registry's
plumbing, ELLE-A's adaptive lambda against a direct transcription of the authors' rule, and the
catastrophic-overfitting signatures."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fastadv_jax import losses, methods, randomness
from fastadv_jax.configs import common
from fastadv_jax.methods import elle, guided, zerograd
from fastadv_jax.methods.base import AttackInputs, RegularizerInputs
from fastadv_jax.training import monitoring

N, D = 8, (6, 6, 1)


def _linear_problem(seed=0, n_classes=2):
  """A linear 2-class model: the CE input gradient of example i is (p1 - y_i') (w1 - w0) with a
  positive scale, so its sign is sign(w1 - w0) for label 0 and the opposite for label 1."""
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(n_classes, int(np.prod(D)))), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(N,) + D), jnp.float32)
  y = jnp.asarray(rng.integers(0, n_classes, N), jnp.int32)

  def logits_fn(z):
    return z.reshape(z.shape[0], -1) @ w.T

  def loss_fn(z):
    return losses.cross_entropy(logits_fn(z), y)

  g_sign = jnp.sign(w[1] - w[0]).reshape(D)[None] * jnp.where(y == 0, 1.0, -1.0)[:, None, None, None]
  return x, y, logits_fn, loss_fn, g_sign


def _inputs(config, x, y, logits_fn, loss_fn, eps, step=0, seed=1):
  keys = randomness.example_keys(jax.random.key(seed), jnp.arange(x.shape[0]))
  m = methods.get(config.method)
  init = m.init_kind(config)  # as the step resolves it
  return AttackInputs(m.args_from(config), loss_fn, logits_fn, x, y, keys, jnp.float32(eps), None, init,
                      jnp.int32(step), jnp.float32(0.5), None)


def _preset_config(preset, **args):
  """The tiny config with a preset applied, its derived values, then `args` (the method's own)."""
  c = tiny_config()
  common.apply_preset(c, preset)
  own = c.method_args[c.method]
  for k, v in methods.get(c.method).derived(c).items():
    own[k] = v
  for k, v in args.items():
    own[k] = v
  return c


def _args(config):
  return methods.get(config.method).args_from(config)


def test_registry_is_the_one_list():
  assert set(methods.names()) >= {"fgsm", "free", "pgd", "nfgsm", "elle", "elle_a", "zerograd",
                                  "multigrad", "gat", "nuat"}
  for preset, (name, fields) in methods.presets().items():
    assert name in methods.names(), preset
    assert set(fields) <= set(methods.get(name).arg_names), preset  # the method's own fields
  with pytest.raises(ValueError, match="unknown method"):
    methods.get("mart")


def test_the_docs_list_every_method():
  from conftest import ROOT
  table = (ROOT / "docs" / "methods.md").read_text()
  for name in methods.names():
    assert f"| `{name}` |" in table, name


def test_nfgsm_is_noise_plus_one_eps_step_and_leaves_the_ball_but_not_the_box():
  x, y, logits_fn, loss_fn, g_sign = _linear_problem()
  eps = 0.1
  c = _preset_config("nfgsm")
  inp = _inputs(c, x, y, logits_fn, loss_fn, eps)
  delta = methods.get("nfgsm").perturb(inp).delta
  eta = randomness.uniform_like(inp.keys, x, -2 * eps, 2 * eps)
  eta = jnp.clip(x + eta, 0, 1) - x
  expected = jnp.clip(x + eta + eps * g_sign, 0, 1) - x
  np.testing.assert_allclose(delta, expected, atol=1e-6)
  assert float(jnp.max(jnp.abs(delta))) > eps * 1.5  # no projection onto the eps-ball
  assert float(jnp.max(jnp.abs(delta))) <= 3 * eps + 1e-6
  assert float(jnp.min(x + delta)) >= 0.0 and float(jnp.max(x + delta)) <= 1.0
  clipped = methods.get("nfgsm").perturb(_inputs(_preset_config("nfgsm", clip=1.0), x, y,
                                                 logits_fn, loss_fn, eps)).delta
  assert float(jnp.max(jnp.abs(clipped))) <= eps + 1e-6


def test_zero_below_quantile_zeroes_the_stated_fraction():
  g = jnp.asarray(np.random.default_rng(0).permutation(np.arange(1, 102))[None, :] *
                  np.where(np.arange(101) % 2, 1.0, -1.0), jnp.float32).reshape(1, 101)
  z = np.asarray(zerograd.zero_below_quantile(g, 0.4))
  # 101 distinct magnitudes 1..101: the 0.4-quantile is 41, so exactly 1..40 are zeroed.
  assert int(np.sum(z == 0)) == 40
  kept = np.abs(np.asarray(g)) >= 41
  np.testing.assert_array_equal(z[kept], np.asarray(g)[kept])


def _below_the_quantile(x: np.ndarray, q: float) -> np.ndarray:
  """The definition in float64 on a sorted copy: |x| < s_lo + frac (s_hi - s_lo), with the
  position q (d - 1) in float32 as jnp.quantile computes it."""
  out = np.zeros(x.shape, bool)
  for b, row in enumerate(np.abs(x.astype(np.float64))):
    if np.isnan(row).any():
      continue  # no quantile: nothing below it
    s = np.sort(row)
    position = np.float32(q) * np.float32(len(row) - 1)
    lo, hi = int(np.floor(position)), int(np.ceil(position))
    out[b] = row < s[lo] + (float(position) - lo) * (s[hi] - s[lo])
  return out


@pytest.mark.parametrize("q", [0.0, 0.4, 0.5, 0.73, 0.999])
def test_below_quantile_is_the_definition_on_ties_zeros_and_nan(q):
  """Selection by bisection over the bit patterns (no sort) gives exactly the entries below the
  quantile: rows of many ties (integers in [-3, 3], half of them zero), tiny (subnormal)
  magnitudes, one entry, and a row with NaN."""
  rng = np.random.default_rng(int(q * 1000))
  rows = [rng.integers(-3, 4, size=(4, 97)).astype(np.float32),
          (rng.normal(size=(3, 64)) * 1e-40).astype(np.float32),
          rng.normal(size=(2, 1)).astype(np.float32),
          np.where(np.arange(50) < 25, 0.0, rng.normal(size=(2, 50))).astype(np.float32)]
  with_nan = rng.normal(size=(2, 30)).astype(np.float32)
  with_nan[1, 4] = np.nan
  rows.append(with_nan)
  for x in rows:
    got = np.asarray(zerograd.below_quantile(jnp.asarray(x), q))
    np.testing.assert_array_equal(got, _below_the_quantile(x, q))
  assert not np.asarray(zerograd.below_quantile(jnp.asarray(with_nan), q))[1].any()


def test_below_quantile_decides_on_the_order_statistics_not_a_rounded_threshold():
  """Two adjacent floats 1 and 1 + ulp at q = 0.1: the quantile 1 + 0.1 ulp lies above 1, so
  the entry 1 is below it, although the interpolated value rounds to 1 in float32 (a threshold
  compared with `<` would keep it)."""
  x = np.array([[1.0, np.nextafter(np.float32(1), np.float32(2))]], np.float32)
  assert float(jnp.quantile(jnp.asarray(x), 0.1, axis=1)[0]) == 1.0  # the rounded threshold
  np.testing.assert_array_equal(np.asarray(zerograd.below_quantile(jnp.asarray(x), 0.1)),
                                [[True, False]])


def test_zerograd_keeps_the_random_start_where_the_gradient_is_zeroed():
  x, y, logits_fn, loss_fn, g_sign = _linear_problem()
  eps = 0.05
  c = _preset_config("zerograd")
  inp = _inputs(c, x, y, logits_fn, loss_fn, eps)
  delta = np.asarray(methods.get("zerograd").perturb(inp).delta)
  g = np.asarray(jax.grad(lambda z: jnp.sum(loss_fn(z)))(x + 0))  # the gradient is start-free
  thresh = np.quantile(np.abs(g).reshape(N, -1), 0.4, axis=1).reshape(N, 1, 1, 1)
  zeroed = np.abs(g) < thresh
  start = np.asarray(jnp.clip(x + eps * randomness.uniform_like(inp.keys, x, -1, 1), 0, 1) - x)
  np.testing.assert_allclose(delta[zeroed], start[zeroed], atol=1e-6)
  # Elsewhere a 2 eps step from inside the ball ends on the ball's face (box permitting).
  moved = np.asarray(jnp.clip(x + eps * g_sign, 0, 1) - x)
  np.testing.assert_allclose(delta[~zeroed], moved[~zeroed], atol=1e-6)
  assert 0.35 < zeroed.mean() < 0.45


def test_multigrad_on_a_linear_model_is_eps_sign_g():
  x, y, logits_fn, loss_fn, g_sign = _linear_problem()
  c = _preset_config("multigrad")
  delta = methods.get("multigrad").perturb(_inputs(c, x, y, logits_fn, loss_fn, 0.05)).delta
  np.testing.assert_allclose(delta, jnp.clip(x + 0.05 * g_sign, 0, 1) - x, atol=1e-6)


def test_multigrad_zeroes_disagreeing_signs():
  x = jnp.full((1, 3), 0.5)
  # loss = sum(z^2 - z): gradient 2z - 1 changes sign inside the ball around 0.5, except where
  # x is far from the minimum; entry 0 and 2 sit at 0.5 (disagree), entry 1 at 0.9 (agrees).
  x = jnp.asarray([[0.5, 0.9, 0.5]])
  loss_fn = lambda z: jnp.sum(z * z - z, axis=-1)  # noqa: E731
  c = _preset_config("multigrad", samples=8)
  inp = AttackInputs(_args(c), loss_fn, None, x, jnp.zeros(1, jnp.int32),
                     randomness.example_keys(jax.random.key(3), jnp.arange(1)), jnp.float32(0.1),
                     None, "zero", jnp.int32(0), jnp.float32(0.5), None)
  delta = np.asarray(methods.get("multigrad").perturb(inp).delta)
  assert delta[0, 1] == pytest.approx(0.1)
  assert delta[0, 0] == 0.0 and delta[0, 2] == 0.0


def test_linearity_error_is_zero_for_an_affine_loss_and_closed_form_for_a_quadratic(x64):
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(N,) + D), jnp.float64)
  keys = randomness.example_keys(jax.random.key(5), jnp.arange(N))
  w = jnp.asarray(np.random.default_rng(2).normal(size=D), jnp.float64)
  affine = lambda z: jnp.sum(z * w, axis=(1, 2, 3)) + 3.0  # noqa: E731
  np.testing.assert_allclose(elle.linearity_error(affine, x, keys, 0.1), 0.0, atol=1e-9)
  quad = lambda z: jnp.sum(z * z, axis=(1, 2, 3))  # noqa: E731
  err = elle.linearity_error(quad, x, keys, 0.1)
  ka, kb, kalpha = randomness.split_keys(keys, 3)
  xa = x + randomness.uniform_like(ka, x, -0.1, 0.1)
  xb = x + randomness.uniform_like(kb, x, -0.1, 0.1)
  a = randomness.uniform_like(kalpha, x[:, :1].reshape(-1, 1), 0, 1).reshape(-1)
  expected = jnp.square(a * (1 - a) * jnp.sum(jnp.square(xa - xb), axis=(1, 2, 3)))
  np.testing.assert_allclose(err, expected, rtol=1e-9)
  assert float(jnp.min(err)) > 0


def test_elle_lambda_follows_the_authors_scripts():
  assert [elle.elle_lambda(e / 255) for e in (2, 8, 10, 20, 22, 26)] == [
      1000, 1000, 5000, 5000, 10000, 10000]
  from fastadv_jax.configs import cifar10
  assert cifar10.get_config("elle,eps=16").method_args.elle.lam == 5000
  assert cifar10.get_config("elle,eps=16,lam=7").method_args.elle.lam == 7  # override wins
  assert cifar10.get_config("elle,eps=16,method_args.elle.lam=8").method_args.elle.lam == 8


def test_elle_a_lambda_matches_the_authors_rule():
  """The authors: lambda used this step, then: if len(history) > 2 and err > mean + 2 std:
  lambda = aux else lambda *= 0.99; history.append(err). Running sums must give the same."""
  c = _preset_config("elle_a")
  errs = [0.10, 0.12, 0.11, 0.13, 0.50, 0.12, 0.11, 0.90, 0.10, 0.10]
  state = methods.get("elle_a").init_state(_args(c))
  lam_ref, history, used, used_ref = 0.0, [], [], []
  for e in errs:
    inp = RegularizerInputs(_args(c), None, None, None, None, None, None, None, None, state, None, None)
    lam, state = elle._adaptive_lambda(inp, jnp.float32(e))
    used.append(float(lam))
    used_ref.append(lam_ref)
    if len(history) > 2 and e > np.mean(history) + 2 * np.std(history):
      lam_ref = 4000.0
    else:
      lam_ref *= 0.99
    history.append(e)
  np.testing.assert_allclose(used, used_ref, rtol=1e-5)
  assert max(used) == 4000.0  # the spike at 0.50 switched it on


def test_gat_and_nuat_regularisers_vanish_without_a_perturbation_and_match_numpy():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(N, 10)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(N, 10)), jnp.float32)
  assert float(jnp.max(guided._softmax_distance(a, a))) == 0.0
  pa, pb = jax.nn.softmax(a), jax.nn.softmax(b)
  np.testing.assert_allclose(guided._softmax_distance(a, b), np.sum((pa - pb) ** 2, -1), rtol=1e-5)
  nuc = np.linalg.norm(np.asarray(a - b), "nuc") / N
  assert float(guided.nuclear_norm(a - b, None)) == pytest.approx(nuc, rel=1e-5)
  a = _args(_preset_config("nuat"))
  assert float(guided.nuat_lambda(a, jnp.float32(0.45))) == pytest.approx(2.25)
  assert float(guided.nuat_lambda(a, jnp.float32(1.0))) == pytest.approx(4.5)


@pytest.mark.parametrize("name", ["gat", "nuat"])
def test_guided_attacks_stay_in_the_ball_and_alternate_their_guide(name):
  x, y, logits_fn, loss_fn, g_sign = _linear_problem(n_classes=3)
  c = _preset_config(name)
  m = methods.get(name)
  d0 = np.asarray(m.perturb(_inputs(c, x, y, logits_fn, loss_fn, 0.1, step=0)).delta)
  assert np.abs(d0).max() <= 0.1 + 1e-6
  assert np.all(x + d0 >= 0) and np.all(x + d0 <= 1)
  assert np.abs(d0).max() > 0.09  # half-eps start plus an eps step reaches the face
  # Step 0 has no guide (the authors' alt = counter % 2): plain CE sign step from the start.
  u = randomness.uniform_like(_inputs(c, x, y, logits_fn, loss_fn, 0.1).keys, x, -1, 1)
  start = jnp.clip(x + 0.05 * jnp.sign(u), 0, 1) - x
  g = jax.grad(lambda z: jnp.sum(loss_fn(z)))(x + start)
  np.testing.assert_allclose(d0, jnp.clip(jnp.clip(start + 0.1 * jnp.sign(g), -0.1, 0.1) + x,
                                          0, 1) - x, atol=1e-6)


def test_fgsm_gap_signature_flags_a_run_that_collapsed_before_its_first_diagnostic():
  c = tiny_config()
  record = monitoring.RunRecord()
  # PGD 0 from the start, FGSM above clean, alignment ~0.1: never an earlier robust point.
  assert monitoring.track_catastrophic_overfitting(record, c, 50, 0.0, 0.1, fgsm_acc=0.75)
  assert (record.co_step, record.co_signature) == (50, "fgsm_gap")
  assert not monitoring.track_catastrophic_overfitting(record, c, 100, 0.0, 0.1, fgsm_acc=0.8)
  healthy = monitoring.RunRecord()  # FGSM a little above PGD, alignment high: no flag
  assert not any(monitoring.track_catastrophic_overfitting(healthy, c, s, 0.60, 0.8, fgsm_acc=0.7)
                 for s in (50, 100))
  aligned = monitoring.RunRecord()  # GradAlign can collapse with its alignment kept high
  assert monitoring.track_catastrophic_overfitting(aligned, c, 50, 0.01, 0.7, fgsm_acc=0.73)
  misaligned = monitoring.RunRecord()  # low alignment with FGSM as strong as PGD: no flag
  assert not monitoring.track_catastrophic_overfitting(misaligned, c, 50, 0.5, 0.1, fgsm_acc=0.6)
  collapse = monitoring.RunRecord()
  monitoring.track_catastrophic_overfitting(collapse, c, 50, 0.4, 0.9, fgsm_acc=0.5)
  assert monitoring.track_catastrophic_overfitting(collapse, c, 100, 0.05, 0.5, fgsm_acc=0.2)
  assert collapse.co_signature == "pgd_collapse"
  assert monitoring.RunRecord.from_json(collapse.to_json()) == collapse
