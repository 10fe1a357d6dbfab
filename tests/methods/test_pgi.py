"""FGSM-PGI, MEP variant (methods/pgi.py): its per-example buffers against a NumPy
transcription of the benchmark's update rule on a linear model, the periodic reset, and the
regulariser's value and gradients against finite differences."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import methods
from fastadv_jax.methods import pgi
from example_state_cases import (C, D, EPS, N, fd_grad, first_draw, inputs, linear_forward,
                                 np_input_grad, np_logits, np_proj, problem, reg_inputs, rows_of,
                                 store)


def _np_smoothed(y, s):
  return np.eye(C)[y] * (1 - s) + s / C


def test_pgi_buffers_follow_the_benchmarks_update_rule(x64):
  args = methods.get("fgsm_pgi").default_args()
  s = 0.4  # the attack's label smoothing
  table, np_delta, np_mom = None, None, np.zeros((N,) + D)
  for k, (idx, x, y, w, b) in enumerate(problem(0)):
    inp = inputs(args, w, b, x, y, rows_of(table, idx), k, attack_smoothing=s)
    if k == 0:  # the authors' reset: eps sign(U(-eps, eps)), momentum 0
      np_delta = np.clip(EPS * np.sign(first_draw(inp)), -EPS, EPS)
    # The benchmark's loop body (fast_at/fgsm_pgi.py), transcribed.
    delta, momentum = np_delta[idx], np_mom[idx]
    adv = np.clip(x + delta, 0, 1)
    g = np_input_grad(w, b, adv, _np_smoothed(y, s))
    momentum = g / np.abs(g).sum() + args.decay * momentum
    next_delta = np_proj(delta + EPS * np.sign(momentum), x)
    delta = np_proj(delta + EPS * np.sign(g), x)
    np_mom[idx], np_delta[idx] = momentum, next_delta

    out = pgi.perturb(inp)
    if k == 0:  # a first visit through the functional front door: the same perturbation
      front = methods.perturb("fgsm_pgi", inp.loss_fn, inp.x, inp.y, jax.random.key(100), EPS)
      # (it takes eps in float32)
      np.testing.assert_allclose(front.delta, out.delta, rtol=0, atol=1e-8)
      np.testing.assert_allclose(front.example_rows["delta"], out.example_rows["delta"],
                                 rtol=0, atol=1e-8)
    np.testing.assert_allclose(out.delta, delta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.aux, adv, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.example_rows["delta"], next_delta, rtol=0, atol=1e-12)
    # (the library's smoothed targets are float32: ~1e-6 relative on some entries of g)
    np.testing.assert_allclose(out.example_rows["momentum"], momentum, rtol=1e-5, atol=1e-12)
    moved_apart = k > 0 and not np.allclose(next_delta, delta)
    table = store(table, idx, out.example_rows)
  assert moved_apart  # with a carried momentum the stored prior is not delta_adv


def test_pgi_with_decay_0_stores_delta_adv_the_ep_variant(x64):
  name, preset = methods.presets()["fgsm_ep"]
  args = methods.get(name).make_args(preset)
  table = None
  for k, (idx, x, y, w, b) in enumerate(problem(1)):
    out = pgi.perturb(inputs(args, w, b, x, y, rows_of(table, idx), k))
    np.testing.assert_array_equal(out.example_rows["delta"], out.delta)
    table = store(table, idx, out.example_rows)


def test_pgi_buffers_restart_every_reset_period(x64):
  steps = problem(2)
  idx0, x0, y0, w0, b0 = steps[0]
  idx, x, y, w, b = steps[1]

  def after_epoch_0(args):
    return store(None, idx0, pgi.perturb(inputs(args, w0, b0, x0, y0, None, 0)).example_rows)

  for reset_every in (1, 2):
    args = methods.get("fgsm_pgi").make_args({"reset_every": reset_every})
    table = after_epoch_0(args)
    out = pgi.perturb(inputs(args, w, b, x, y, rows_of(table, idx), 1, epoch=1))
    fresh = pgi.perturb(inputs(args, w, b, x, y, None, 1, epoch=1))  # a first visit
    np.testing.assert_array_equal(out.example_rows["period"], 1 // reset_every + 1)
    g = np_input_grad(w, b, np.asarray(fresh.aux if reset_every == 1 else out.aux),
                       np.eye(C)[y])
    if reset_every == 1:  # epoch 1 starts a period: re-initialised, momentum restarted
      for a, f in zip(jax.tree.leaves(out), jax.tree.leaves(fresh)):
        np.testing.assert_array_equal(a, f)
      np.testing.assert_allclose(out.example_rows["momentum"], g / np.abs(g).sum(), rtol=1e-10)
    else:  # the same period: the stored prior and momentum go on
      np.testing.assert_allclose(out.aux, np.clip(x + table["delta"][idx], 0, 1), atol=1e-12)
      np.testing.assert_allclose(out.example_rows["momentum"],
                                 g / np.abs(g).sum() + args.decay * table["momentum"][idx],
                                 rtol=1e-10)


def test_pgi_regulariser_is_lam_mse_with_gradients_through_both_outputs(x64):
  idx, x, y, w, b = problem(3)[1]
  rng = np.random.default_rng(3)
  delta = rng.choice([-EPS, EPS], size=x.shape)
  x0 = np.clip(x + rng.choice([-EPS, EPS], size=x.shape), 0, 1)
  args = methods.get("fgsm_pgi").default_args()

  def np_loss(w_, b_):  # lam * torch MSELoss(f(x + delta), f(x0)): mean over batch x classes
    return args.lam * np.mean((np_logits(w_, b_, x + delta) - np_logits(w_, b_, x0)) ** 2)

  def jax_loss(params):
    inp = reg_inputs(args, params, x, y, delta, x0)
    logits, _ = linear_forward(params, inp.x + inp.delta)
    out = pgi.regularizer(inp._replace(logits=logits))
    return out.local, out.value

  params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
  (local, value), grads = jax.value_and_grad(jax_loss, has_aux=True)(params)
  assert float(value) == pytest.approx(np_loss(w, b), rel=1e-12) and float(local) == float(value)
  fd_w, fd_b = fd_grad(np_loss, w, b)
  np.testing.assert_allclose(grads["w"], fd_w, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(grads["b"], fd_b, rtol=1e-6, atol=1e-8)
