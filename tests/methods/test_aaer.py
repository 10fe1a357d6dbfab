"""N-AAER (methods/aaer.py): the regulariser against a NumPy transcription of the
authors' loss, its gradients, and its attack (N-FGSM's, with the start passed on)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import losses, methods, randomness
from fastadv_jax.methods import aaer
from fastadv_jax.methods.base import AttackInputs
from one_step_cases import C, N, linear, reg_inputs


def _aaer_case(seed, scale_abnormal=1.0, n_abnormal=None):
  rng = np.random.default_rng(seed)
  za = rng.normal(size=(N, C)).astype(np.float32)
  zb = za + rng.normal(size=(N, C)).astype(np.float32)
  la = rng.uniform(0.5, 2.0, N).astype(np.float32)
  lb = la + rng.normal(size=N).astype(np.float32)
  if n_abnormal is not None:  # force |A|
    lb = la + np.where(np.arange(N) < n_abnormal, 0.5, -0.5).astype(np.float32)
  abnormal = lb > la
  zb[abnormal] = za[abnormal] + scale_abnormal * (zb[abnormal] - za[abnormal])
  return za, zb, la, lb


def _aaer_reference(za, zb, la, lb, lam1=1.0, lam2=1.5, lam3=0.15, clamp=100.0):
  """The benchmark's fast_at/aaer.py loss on top of mean l_a, in NumPy (its `_aaer_attack` and
  the `if abnormal_count != 0 and normal_count != 0` block)."""
  abnormal, normal = lb > la, lb <= la
  n_a, n_n = abnormal.sum(), normal.sum()
  if n_a == 0 or n_n == 0:
    return 0.0
  v_a = ((zb[abnormal] - za[abnormal]) ** 2).sum(1).mean(0)
  v_n = ((zb[normal] - za[normal]) ** 2).sum(1).mean(0)
  ce_a = (abnormal * (lb - la)).sum() / n_a
  diff = np.clip(v_a - v_n, -clamp, clamp) if clamp else v_a - v_n
  return lam1 * n_a / lb.shape[0] * (lam2 * ce_a + lam3 * max(diff, 0.0))


@pytest.mark.parametrize("case", [
    dict(seed=0),                                   # mixed sets, hinge active
    dict(seed=1, scale_abnormal=0.1),               # V_A < V_N: hinge off, only the lam2 term
    dict(seed=2, scale_abnormal=30.0),              # V_A - V_N > 100: clamped
    dict(seed=3, n_abnormal=0),                     # |A| = 0: no term
    dict(seed=4, n_abnormal=N),                     # |N| = 0: no term
    dict(seed=5, n_abnormal=3),
])
def test_aaer_term_matches_the_benchmarks_loss(case):
  za, zb, la, lb = _aaer_case(**case)
  args = aaer.AAERArgs()
  got = float(aaer.aaer_term(args, jnp.asarray(za), jnp.asarray(zb), jnp.asarray(la),
                             jnp.asarray(lb)))
  assert got == pytest.approx(_aaer_reference(za, zb, la, lb), rel=1e-5, abs=1e-7)
  unclamped = aaer.AAERArgs(var_clamp=0.0)  # the authors' original: no clamp
  got = float(aaer.aaer_term(unclamped, jnp.asarray(za), jnp.asarray(zb), jnp.asarray(la),
                             jnp.asarray(lb)))
  assert got == pytest.approx(_aaer_reference(za, zb, la, lb, clamp=0.0), rel=1e-5, abs=1e-7)
  if case.get("scale_abnormal") == 30.0:  # the clamp did bind
    assert _aaer_reference(za, zb, la, lb) != pytest.approx(
        _aaer_reference(za, zb, la, lb, clamp=0.0))


def test_aaer_regularizer_uses_the_training_logits_and_only_v_a_has_a_gradient():
  w, x, y, forward = linear()
  rng = np.random.default_rng(7)
  delta = jnp.asarray(rng.uniform(-0.1, 0.1, x.shape), jnp.float32)
  abnormal = np.arange(N) % 2 == 0  # |A| = 4, with the larger output change: V_A > V_N
  z_b = forward(w, x + delta)[0] + jnp.asarray(
      np.where(abnormal[:, None], 2.0, 0.5) * rng.normal(size=(N, C)), jnp.float32)
  la = np.asarray(losses.cross_entropy(forward(w, x + delta)[0], y))
  l_b = jnp.asarray(la + np.where(abnormal, 0.3, -0.3), jnp.float32)

  def reg(params, args):
    logits = forward(params, x + delta)[0]
    return aaer.regularizer(reg_inputs(args, forward, params, x, y, delta, logits,
                                        (z_b, l_b))).local

  args = aaer.AAERArgs(var_clamp=0.0)
  za = np.asarray(forward(w, x + delta)[0])
  assert float(reg(w, args)) == pytest.approx(
      _aaer_reference(za, np.asarray(z_b), la, np.asarray(l_b), clamp=0.0), rel=1e-5)
  # The lam2 term (l_a detached, as in both codes) has a value but exactly no gradient.
  only_lam2 = aaer.AAERArgs(lam3=0.0)
  assert float(reg(w, only_lam2)) > 0.01
  assert float(jnp.max(jnp.abs(jax.grad(reg)(w, only_lam2)))) == 0.0
  # So the whole gradient is lam3's: dropping lam2 changes the value but not the gradient.
  no_lam2 = aaer.AAERArgs(lam2=0.0, var_clamp=0.0)
  assert float(reg(w, no_lam2)) < float(reg(w, args)) - 0.01
  g, g0 = jax.grad(reg)(w, args), jax.grad(reg)(w, no_lam2)
  assert float(jnp.max(jnp.abs(g))) > 1e-3
  np.testing.assert_array_equal(g, g0)


def test_aaer_attack_is_nfgsm_and_passes_the_start_on():
  w, x, y, forward = linear()
  logits_fn = lambda z: forward(w, z)[0]  # noqa: E731
  loss_fn = lambda z: losses.cross_entropy(logits_fn(z), y, 0.4)  # noqa: E731  (not used)
  keys = randomness.example_keys(jax.random.key(3), jnp.arange(N))
  eps = 0.05
  inp = AttackInputs(args=aaer.AAERArgs(), loss_fn=loss_fn, logits_fn=logits_fn, x=x, y=y,
                     keys=keys, eps=jnp.float32(eps), carried=None, init="zero",
                     step=jnp.int32(0), progress=jnp.float32(0.5), axis_name=None)
  pert = methods.get("n_aaer").perturb(inp)
  eta = jnp.clip(x + randomness.uniform_like(keys, x, -2 * eps, 2 * eps), 0, 1) - x
  g = jax.grad(lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), y)))(x + eta)
  np.testing.assert_allclose(pert.delta, jnp.clip(x + eta + eps * jnp.sign(g), 0, 1) - x,
                             atol=1e-6)
  assert float(jnp.max(jnp.abs(pert.delta))) > 1.5 * eps  # no eps-ball projection
  z_b, l_b = pert.aux
  np.testing.assert_allclose(z_b, logits_fn(x + eta), rtol=1e-6)
  np.testing.assert_allclose(l_b, losses.cross_entropy(logits_fn(x + eta), y), rtol=1e-6)
