"""LIET and the UAP family (FGSM-UAP / CUAP / FUAP): the random-label-smoothing CE, LIET's
class-wise starts in closed form, the UAP momentum updates against a NumPy transcription of the
authors' loop, FUAP's head (Adam, assignment), and 8 devices == 1 device."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from fastadv_jax import losses, methods, randomness
from fastadv_jax.methods import liet, uap
from fastadv_jax.methods.base import AttackInputs
from test_train_step import N_DEV, DEVICE_SPLIT_RTOL, _max_rel_err, _run

B, D = 8, (5, 5, 1)
EPS, EPS_U = 0.03, 0.05  # eps_u > eps, as 10/255 > 8/255


def _linear(n_classes, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(n_classes, int(np.prod(D)))).astype(np.float32)

  def logits_fn(z):
    return z.reshape(z.shape[0], -1) @ jnp.asarray(w).T

  return w, logits_fn


def _batch(seed, n_classes, labels=None):
  rng = np.random.default_rng(100 + seed)
  x = rng.uniform(0.2, 0.8, size=(B,) + D).astype(np.float32)  # no [0, 1] clipping within eps
  y = (rng.integers(0, n_classes, B) if labels is None else np.asarray(labels)).astype(np.int32)
  return x, y


def _inputs(name, x, y, logits_fn, state, step, **kw):
  m = methods.get(name)
  keys = randomness.example_keys(jax.random.key(7 + step), jnp.arange(x.shape[0]))
  y = jnp.asarray(y)
  fields = dict(args=kw.pop("args", m.default_args()),
                loss_fn=lambda z: losses.cross_entropy(logits_fn(z), y), logits_fn=logits_fn,
                x=jnp.asarray(x), y=y, keys=keys, eps=jnp.float32(EPS), carried=None,
                init="zero", step=jnp.int32(step), progress=jnp.float32(0.5), axis_name=None,
                state=state, batch_key=jax.random.key(1000 + step))
  fields.update(kw)
  return AttackInputs(**fields)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ---- LIET ----------------------------------------------------------------------------------

def test_random_label_smoothing_against_numpy():
  rng = np.random.default_rng(0)
  n, c, s = 6, 5, 0.6
  draws = rng.uniform(size=(n, c)).astype(np.float32)
  labels = rng.integers(0, c, n)
  t = np.asarray(liet.random_smoothed_targets(jnp.asarray(draws), jnp.asarray(labels), s))
  expect = np.zeros((n, c))
  for i in range(n):
    others = [j for j in range(c) if j != labels[i]]
    expect[i, labels[i]] = 1 - s
    expect[i, others] = s * draws[i, others] / draws[i, others].sum()
  np.testing.assert_allclose(t, expect, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
  # The loss draws fresh U(0, 1) per example from its keys: the same draws reproduce it.
  logits = rng.normal(size=(n, c)).astype(np.float32)
  keys = randomness.example_keys(jax.random.key(3), jnp.arange(n))
  d = np.asarray(randomness.uniform_like(keys, jnp.asarray(logits), 0.0, 1.0))
  ce = np.asarray(liet.random_smoothing_ce(jnp.asarray(logits), jnp.asarray(labels), keys, s))
  tt = np.asarray(liet.random_smoothed_targets(jnp.asarray(d), jnp.asarray(labels), s))
  logp = np.log(_softmax(logits.astype(np.float64)))
  np.testing.assert_allclose(ce, -(tt * logp).sum(-1), rtol=1e-5)
  other_keys = randomness.example_keys(jax.random.key(4), jnp.arange(n))
  assert not np.allclose(ce, liet.random_smoothing_ce(jnp.asarray(logits), jnp.asarray(labels),
                                                      other_keys, s))  # the draws matter


def test_js_divergence_and_lambda_ramp():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  p, q = _softmax(a), _softmax(b)
  m = (p + q) / 2
  expect = 0.5 * ((p * np.log(p / m)).sum(-1) + (q * np.log(q / m)).sum(-1))
  np.testing.assert_allclose(liet.js_divergence(jnp.asarray(a, jnp.float32),
                                                jnp.asarray(b, jnp.float32)), expect, rtol=1e-4)
  args = liet.LIETArgs()
  assert float(liet.liet_lambda(args, jnp.float32(0.25))) == pytest.approx(25.0)
  assert float(liet.liet_lambda(args, jnp.float32(1.0))) == pytest.approx(100.0)


def test_liet_class_wise_start_in_closed_form_and_refreshed_every_20_steps():
  c, s = 4, 0.6
  w, logits_fn = _linear(c)
  x, y = _batch(0, c)
  args = methods.get("liet").make_args({"mask_min": 0.0, "mask_max": 0.0})  # no masking
  sentinel = {"li_sign": jnp.ones((c,) + D)}

  def closed_form(batch_key):
    # grad_x rLS-CE(Wx, c) = W^T (softmax(W x) - t_c) at x = 0.5, t_c from the class keys' draws.
    grey = np.full((c, int(np.prod(D))), 0.5, np.float32)
    logits = grey @ w.T
    draws = randomness.uniform_like(liet._class_keys(batch_key, c), jnp.asarray(logits), 0., 1.)
    t = np.asarray(liet.random_smoothed_targets(draws, jnp.arange(c), s))
    return np.sign((_softmax(logits) - t) @ w).reshape((c,) + D)

  for step in (0, 1, 19, 20, 41):
    inp = _inputs("liet", x, y, logits_fn, sentinel, step, args=args, eval_logits_fn=logits_fn)
    out = methods.get("liet").perturb(inp)
    li = np.asarray(out.state["li_sign"])
    if step % 20 == 0:
      expect = closed_form(inp.batch_key)
      assert np.all(expect != 0)
      np.testing.assert_array_equal(li, expect)
    else:
      np.testing.assert_array_equal(li, np.ones((c,) + D))  # kept between refreshes
    # The start is +-eps * LI_y with one sign for the whole batch; then one eps step.
    start = np.asarray(out.aux)
    signs = {float(v) for v in np.unique(np.sign(start / li[y]))}
    assert len(signs) == 1 and signs <= {-1.0, 1.0}
    np.testing.assert_allclose(np.abs(start), EPS, rtol=1e-5)
    d = np.asarray(out.delta)
    assert np.abs(d).max() <= EPS + 1e-6
  # Masking every element: the start is U(-eps, eps) noise, not the class-wise sign.
  full = methods.get("liet").make_args({"mask_min": 1.0, "mask_max": 1.0})
  out = methods.get("liet").perturb(_inputs("liet", x, y, logits_fn, sentinel, 1, args=full))
  start = np.abs(np.asarray(out.aux))
  assert start.max() <= EPS and start.min() < 0.5 * EPS


# ---- UAP family: a NumPy transcription of the authors' update -------------------------------

def _np_uap_step(u, m, x, y, k, w, decay, eps_u, eps):
  """One iteration of the authors' loop: start, FGSM, momentum and UAP update."""
  x0 = np.clip(x + np.clip(u[k], -eps, eps), 0, 1)
  flat = x0.reshape(len(x0), -1)
  g = ((_softmax(flat @ w.T) - np.eye(w.shape[0])[y]) @ w).reshape(x.shape)  # CE input grads
  x_adv = np.clip(x + np.clip(x0 + eps * np.sign(g) - x, -eps, eps), 0, 1)
  g_hat = g / np.abs(g).sum()
  u, m = u.copy(), m.copy()
  for j in sorted(set(k.tolist())):
    m[j] = g_hat[k == j].mean(0) + decay * m[j]
    u[j] = np.clip(u[j] + eps_u * np.sign(m[j]), -eps_u, eps_u)
  return u, m, x0 - x, x_adv - x


@pytest.mark.parametrize("name,n_uaps", [("fgsm_uap", 1), ("fgsm_cuap", 4)])
def test_uap_updates_against_numpy_transcription(name, n_uaps):
  c = 4
  w, logits_fn = _linear(c)
  m_rec = methods.get(name)
  args = m_rec.make_args({"eps_u": EPS_U})
  state = {"u": jnp.zeros((n_uaps,) + D), "m": jnp.zeros((n_uaps,) + D)}
  u = m_np = None
  for step in range(3):
    x, y = _batch(step, c, labels=[0, 1, 2, 0, 1, 2, 0, 0] if step == 1 else None)
    y = np.where(y == 3, 2, y)  # class 3 is never seen
    out = m_rec.perturb(_inputs(name, x, y, logits_fn, state, step, args=args))
    k = np.zeros(B, np.int64) if n_uaps == 1 else y
    if step == 0:  # the UAPs start at +-eps_u (drawn now): read their signs off the start
      start = np.asarray(out.aux)
      np.testing.assert_allclose(np.abs(start), EPS, rtol=1e-6)
      u = np.asarray(out.state["u"]).copy()  # absent UAPs keep their random start
      for j in set(k.tolist()):
        u[j] = EPS_U * np.sign(start[k == j][0])
      np.testing.assert_allclose(np.abs(u), EPS_U, rtol=1e-6)
      m_np = np.zeros_like(u)
    u, m_np, d0, d = _np_uap_step(u, m_np, x, y, k, w, args.decay, EPS_U, EPS)
    np.testing.assert_allclose(out.aux, d0, atol=1e-6)
    np.testing.assert_allclose(out.delta, d, atol=1e-6)
    np.testing.assert_allclose(out.state["m"], m_np, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(out.state["u"], u, atol=1e-7)
    assert set(np.unique(np.round(np.asarray(out.state["u"]) / EPS_U, 5))) <= {-1.0, 0.0, 1.0}
    state = out.state
  assert np.any(np.asarray(state["u"]) == 0)  # some entries reversed to 0 over the steps
  if n_uaps == 4:
    np.testing.assert_array_equal(np.asarray(state["m"])[3], 0.0)  # absent class: untouched


# ---- FUAP ---------------------------------------------------------------------------------

def test_head_adam_step_equals_optax_adam():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  opt = optax.adam(1e-3)
  ref, ref_state = params, opt.init(params)
  mine, mu, nu = params, jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params)
  count = jnp.zeros((), jnp.int32)
  for _ in range(3):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    upd, ref_state = opt.update(g, ref_state, ref)
    ref = optax.apply_updates(ref, upd)
    mine, mu, nu, count = uap.adam_step(mine, g, mu, nu, count, 1e-3)
  for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert _max_rel_err(mine, params) > 1e-4


def test_fuap_assigns_by_the_hidden_argmax_and_steps_the_head():
  c, fd, n_uaps, ls = 4, 6, 5, 0.4
  w, logits_fn = _linear(c)
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(B, fd)).astype(np.float32)  # a model whose features are fixed
  eps_u = 2.5 * EPS  # above 2 eps: the noisy start plus u_k is cut to eps * sign(u_k)
  args = methods.get("fgsm_fuap").make_args({"eps_u": eps_u, "n_uaps": n_uaps})
  head = uap.init_head(jax.random.key(5), fd, n_uaps, c)
  zeros = jax.tree.map(jnp.zeros_like, head)
  u = eps_u * np.sign(rng.uniform(-1, 1, size=(n_uaps,) + D)).astype(np.float32)
  state = {"u": jnp.asarray(u), "m": jnp.zeros((n_uaps,) + D), "head": head, "mu": zeros,
           "nu": zeros, "count": jnp.zeros((), jnp.int32)}
  x, y = _batch(0, c)
  out = methods.get("fgsm_fuap").perturb(_inputs(
      "fgsm_fuap", x, y, logits_fn, state, 1, args=args, label_smoothing=ls,
      features_fn=lambda z: (jnp.asarray(feats), logits_fn(z))))
  hidden = feats @ np.asarray(head["w1"]) + np.asarray(head["b1"])
  k = hidden.argmax(-1)
  assert len(set(k.tolist())) > 1
  # The start is eps * sign(u_k), which names k.
  np.testing.assert_allclose(out.aux, EPS * np.sign(u[k]), atol=1e-7)

  def head_loss(h):
    return jnp.mean(losses.cross_entropy(uap.head_apply(h, jnp.asarray(feats))[1],
                                         jnp.asarray(y), ls))

  opt = optax.adam(1e-3)
  upd, _ = opt.update(jax.grad(head_loss)(head), opt.init(head), head)
  for a, b in zip(jax.tree.leaves(out.state["head"]), jax.tree.leaves(optax.apply_updates(head,
                                                                                         upd))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(out.state["count"]) == 1
  # Only the assigned UAPs move.
  moved = np.any(np.asarray(out.state["m"]).reshape(n_uaps, -1) != 0, axis=1)
  np.testing.assert_array_equal(moved, np.isin(np.arange(n_uaps), k))


def test_fuap_head_starts_from_torch_default_init_at_step_0():
  c, fd = 4, 6
  _, logits_fn = _linear(c)
  info = methods.base.ModelInfo(D, c, fd)
  m = methods.get("fgsm_fuap")
  state = m.initial_state(m.default_args(), info)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(state))
  x, y = _batch(0, c)
  out = m.perturb(_inputs("fgsm_fuap", x, y, logits_fn, state, 0,
                          features_fn=lambda z: (z.reshape(B, -1)[:, :fd], logits_fn(z))))
  w1 = np.asarray(out.state["head"]["w1"])
  assert w1.shape == (fd, 50) and 0 < np.abs(w1).max() <= 1 / np.sqrt(fd) + 2e-3
  u = np.abs(np.asarray(out.state["u"]))
  assert np.all(np.isclose(u, 0.0) | np.isclose(u, 10 / 255)) and u.max() > 0


# ---- the pmapped step -------------------------------------------------------------------

# The benchmark's label smoothing 0.4, except for CUAP: on these batches, with 0.4, one CUAP
# example's second-step input gradient crosses a ReLU / max-pool tie at float32 rounding, so its
# FGSM signs (and then the weights, by 0.5 %) differ between the two device counts; a
# discontinuity of any sign step, not of the method.
@pytest.mark.parametrize("method,smoothing", [("liet", 0.4), ("fgsm_uap", 0.4),
                                              ("fgsm_cuap", 0.0), ("fgsm_fuap", 0.4)])
def test_pmapped_step_equals_single_device_step(method, smoothing):
  assert jax.local_device_count() >= N_DEV, "conftest sets JAX_NUM_CPU_DEVICES=8"
  c = tiny_config(method=method, grad_align_lambda=0.0, crop_padding=2, flip=True,
                  batch_size=16, label_smoothing=smoothing)
  one, m1, init = _run(c, 1)
  many, m8, _ = _run(c, N_DEV)
  assert (_max_rel_err((one.params, one.batch_stats), (many.params, many.batch_stats))
          < DEVICE_SPLIT_RTOL)
  assert _max_rel_err(one.params, init.params) > 1e-4
  for a, b in zip(m1, m8):
    for k in ("train_loss", "train_ce", "train_method_reg"):
      assert a[k] == pytest.approx(b[k], rel=DEVICE_SPLIT_RTOL, abs=1e-7), k
  assert m1[-1]["train_method_reg"] > 0
  for a, b in zip(jax.tree.leaves(one.method_state), jax.tree.leaves(many.method_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert any(np.abs(np.asarray(v)).max() > 0 for v in jax.tree.leaves(one.method_state))
