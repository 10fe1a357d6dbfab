"""FGSM-PCO (methods/pco.py): its per-example buffer and mixture against a NumPy transcription
of the benchmark's update rule, the soft targets, and the loss's gradients through the
confidence against finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import methods
from fastadv_jax.methods import pco
from fastadv_jax.methods.base import CELossInputs
from example_state_cases import (C, EPS, fd_grad, first_draw, inputs, linear_forward,
                                 np_input_grad, np_logits, np_proj, np_softmax, problem,
                                 reg_inputs, rows_of, store)


def _np_soft(y, target, s):
  onehot = np.eye(C)[y]
  t = onehot * target + (1 - onehot) * (1 - target) / (C - 1)
  return t * (1 - s) + s / C


def _np_pco(w, b, x, y, delta, args, s):
  """The benchmark's FGSM-PCO loop body (fast_at/fgsm_pco.py) up to X_new: (delta_FGSM, X_new)."""
  ori = np_logits(w, b, x + delta)
  conf = np.clip(1 - np_softmax(ori)[np.arange(len(y)), y], 0, 1)[:, None, None, None]
  g = np_input_grad(w, b, x + delta, _np_soft(y, args.target, s))
  delta_fgsm = np_proj(delta + EPS * np.sign(g), x)
  x_new = conf * (x + delta) + (1 - conf) * (x + args.beta * delta_fgsm)
  return delta_fgsm, x_new


def test_pco_buffer_and_mixture_follow_the_benchmarks_update_rule(x64):
  args = methods.get("fgsm_pco").default_args()
  s = 0.4  # the benchmark's smoothing on top of the 0.6 soft targets
  table, np_delta = None, None
  for k, (idx, x, y, w, b) in enumerate(problem(4)):
    inp = inputs(args, w, b, x, y, rows_of(table, idx), k, smoothing=s)
    if k == 0:
      np_delta = np.clip(EPS * np.sign(first_draw(inp)), -EPS, EPS)
    delta_bar = np_delta[idx]
    delta_fgsm, x_new = _np_pco(w, b, x, y, delta_bar, args, s)
    np_delta[idx] = delta_fgsm

    out = pco.perturb(inp)
    np.testing.assert_allclose(out.aux, delta_bar, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.delta, delta_fgsm, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.example_rows["delta"], delta_fgsm, rtol=0, atol=1e-12)
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    mixed, z0 = pco.mixture(reg_inputs(args, params, x, y, out.delta, out.aux))
    np.testing.assert_allclose(mixed, x_new, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z0, np_logits(w, b, x + delta_bar), rtol=1e-12)
    table = store(table, idx, out.example_rows)


def test_pco_soft_targets_are_the_authors_then_pytorchs_smoothing():
  t = np.asarray(pco.soft_targets(jnp.array([2]), 10, 0.6))
  np.testing.assert_allclose(t[0], [0.4 / 9] * 2 + [0.6] + [0.4 / 9] * 7, rtol=1e-6)
  ts_ = np.asarray(pco.soft_targets(jnp.array([2]), 10, 0.6, 0.4))
  assert ts_[0, 2] == pytest.approx(0.6 * 0.6 + 0.04) and ts_[0, 0] == pytest.approx(
      0.6 * 0.4 / 9 + 0.04)


@pytest.mark.parametrize("s", [0.0, 0.4])
def test_pco_loss_matches_numpy_with_gradients_through_c(x64, s):
  idx, x, y, w, b = problem(5)[1]
  rng = np.random.default_rng(5)
  delta_bar = rng.choice([-EPS, EPS], size=x.shape)
  args = methods.get("fgsm_pco").default_args()
  delta, _ = _np_pco(w, b, x, y, delta_bar, args, s)  # the attack's output, fixed in the loss
  t = _np_soft(y, args.target, s)

  def np_loss(w_, b_, c_weights=None):
    """Soft CE at X_new + lam |MSE(f(x + delta), z0) - MSE(f(x + delta), f(X_new))|; c from
    the weights `c_weights` (default: those differentiated, as the authors' undetached c)."""
    cw = (w_, b_) if c_weights is None else c_weights
    z0 = np_logits(w_, b_, x + delta_bar)
    c = np.clip(1 - np_softmax(np_logits(*cw, x + delta_bar))[np.arange(len(y)), y], 0, 1)
    c = c[:, None, None, None]
    out = np_logits(w_, b_, c * (x + delta_bar) + (1 - c) * (x + args.beta * delta))
    adv = np_logits(w_, b_, x + delta)
    ce = np.mean(-np.sum(t * np.log(np_softmax(out)), -1))
    return ce + args.lam * abs(np.mean((adv - z0) ** 2) - np.mean((adv - out) ** 2))

  def jax_loss(params):
    inp = reg_inputs(args, params, x, y, delta, delta_bar)
    x_new, z0 = pco.mixture(inp)
    logits, _ = linear_forward(params, x_new)
    ce = jnp.mean(pco.train_ce(CELossInputs(args, logits, inp.y, inp.keys, s)))
    reg = pco.regularizer(inp._replace(logits=logits, ce_aux=z0))
    return ce + reg.local, reg.value

  params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
  (loss, reg_value), grads = jax.value_and_grad(jax_loss, has_aux=True)(params)
  assert float(loss) == pytest.approx(np_loss(w, b), rel=1e-12)
  assert float(reg_value) > 0
  fd_w, fd_b = fd_grad(np_loss, w, b)
  np.testing.assert_allclose(grads["w"], fd_w, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(grads["b"], fd_b, rtol=1e-6, atol=1e-8)
  # The path through c matters: with c held fixed the gradient is another one.
  fixed_w, _ = fd_grad(lambda w_, b_: np_loss(w_, b_, (w, b)), w, b)
  assert np.max(np.abs(fixed_w - fd_w)) > 1e-3 * np.max(np.abs(fd_w))
