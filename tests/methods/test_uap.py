"""The UAP family, FGSM-UAP / CUAP / FUAP (methods/uap.py): the momentum updates against a
NumPy transcription of the authors' loop, FUAP's head (Adam, assignment, initialisation)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastadv_jax import losses, methods
from fastadv_jax.methods import uap
from test_train_step import _max_rel_err
from stateful_cases import B, D, EPS, EPS_U, batch, inputs, linear, softmax


def _np_uap_step(u, m, x, y, k, w, decay, eps_u, eps):
  """One iteration of the authors' loop: start, FGSM, momentum and UAP update."""
  x0 = np.clip(x + np.clip(u[k], -eps, eps), 0, 1)
  flat = x0.reshape(len(x0), -1)
  g = ((softmax(flat @ w.T) - np.eye(w.shape[0])[y]) @ w).reshape(x.shape)  # CE input grads
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
  w, logits_fn = linear(c)
  m_rec = methods.get(name)
  args = m_rec.make_args({"eps_u": EPS_U})
  state = {"u": jnp.zeros((n_uaps,) + D), "m": jnp.zeros((n_uaps,) + D)}
  u = m_np = None
  for step in range(3):
    x, y = batch(step, c, labels=[0, 1, 2, 0, 1, 2, 0, 0] if step == 1 else None)
    y = np.where(y == 3, 2, y)  # class 3 is never seen
    out = m_rec.perturb(inputs(name, x, y, logits_fn, state, step, args=args))
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
  w, logits_fn = linear(c)
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(B, fd)).astype(np.float32)  # a model whose features are fixed
  eps_u = 2.5 * EPS  # above 2 eps: the noisy start plus u_k is cut to eps * sign(u_k)
  args = methods.get("fgsm_fuap").make_args({"eps_u": eps_u, "n_uaps": n_uaps})
  head = uap.init_head(jax.random.key(5), fd, n_uaps, c)
  zeros = jax.tree.map(jnp.zeros_like, head)
  u = eps_u * np.sign(rng.uniform(-1, 1, size=(n_uaps,) + D)).astype(np.float32)
  state = {"u": jnp.asarray(u), "m": jnp.zeros((n_uaps,) + D), "head": head, "mu": zeros,
           "nu": zeros, "count": jnp.zeros((), jnp.int32)}
  x, y = batch(0, c)
  out = methods.get("fgsm_fuap").perturb(inputs(
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
  _, logits_fn = linear(c)
  info = methods.base.ModelInfo(D, c, fd)
  m = methods.get("fgsm_fuap")
  state = m.initial_state(m.default_args(), info)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(state))
  x, y = batch(0, c)
  out = m.perturb(inputs("fgsm_fuap", x, y, logits_fn, state, 0,
                          features_fn=lambda z: (z.reshape(B, -1)[:, :fd], logits_fn(z))))
  w1 = np.asarray(out.state["head"]["w1"])
  assert w1.shape == (fd, 50) and 0 < np.abs(w1).max() <= 1 / np.sqrt(fd) + 2e-3
  u = np.abs(np.asarray(out.state["u"]))
  assert np.all(np.isclose(u, 0.0) | np.isclose(u, 10 / 255)) and u.max() > 0
