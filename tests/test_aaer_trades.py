"""N-AAER, TRADES and the benchmark's PGD-AT: the N-AAER regulariser against a NumPy
transcription of the authors' loss, TRADES' KL and attack against their update rule, both
eval-mode attacks against attacks written by hand on eval-mode logits, a linear model's closed
form, and N devices == 1 device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fastadv_jax import attacks, losses, methods, models, parallel, randomness
from fastadv_jax.methods import aaer, trades
from fastadv_jax.methods.base import AttackInputs, RegularizerInputs
from fastadv_jax.training import model_config, train_step
from fastadv_jax.training import train_state as ts
from test_train_step import N_DEV, N_EXAMPLES, _batch, DEVICE_SPLIT_RTOL, _max_rel_err

N, D, C = 8, (6, 6, 1), 10


# ---------------------------------------------------------------------------------------------
# N-AAER


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


def _linear(seed=0):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(int(np.prod(D)), C)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(N,) + D), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, N), jnp.int32)
  forward = lambda params, z: (z.reshape(z.shape[0], -1) @ params, None)  # noqa: E731
  return w, x, y, forward


def _reg_inputs(args, forward, params, x, y, delta, logits, aux=None):
  keys = randomness.example_keys(jax.random.key(0), jnp.arange(x.shape[0]))
  return RegularizerInputs(args, forward, params, x, y, delta, logits, keys, jnp.float32(0.1),
                           None, jnp.float32(0.5), None, aux)


def test_aaer_regularizer_uses_the_training_logits_and_only_v_a_has_a_gradient():
  w, x, y, forward = _linear()
  rng = np.random.default_rng(7)
  delta = jnp.asarray(rng.uniform(-0.1, 0.1, x.shape), jnp.float32)
  abnormal = np.arange(N) % 2 == 0  # |A| = 4, with the larger output change: V_A > V_N
  z_b = forward(w, x + delta)[0] + jnp.asarray(
      np.where(abnormal[:, None], 2.0, 0.5) * rng.normal(size=(N, C)), jnp.float32)
  la = np.asarray(losses.cross_entropy(forward(w, x + delta)[0], y))
  l_b = jnp.asarray(la + np.where(abnormal, 0.3, -0.3), jnp.float32)

  def reg(params, args):
    logits = forward(params, x + delta)[0]
    return aaer.regularizer(_reg_inputs(args, forward, params, x, y, delta, logits,
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
  w, x, y, forward = _linear()
  logits_fn = lambda z: forward(w, z)[0]  # noqa: E731
  loss_fn = lambda z: losses.cross_entropy(logits_fn(z), y, 0.4)  # noqa: E731  (not used)
  keys = randomness.example_keys(jax.random.key(3), jnp.arange(N))
  eps = 0.05
  inp = AttackInputs(aaer.AAERArgs(), loss_fn, logits_fn, x, y, keys, jnp.float32(eps), None,
                     "zero", jnp.int32(0), jnp.float32(0.5), None)
  pert = methods.get("n_aaer").perturb(inp)
  eta = jnp.clip(x + randomness.uniform_like(keys, x, -2 * eps, 2 * eps), 0, 1) - x
  g = jax.grad(lambda z: jnp.sum(losses.cross_entropy(logits_fn(z), y)))(x + eta)
  np.testing.assert_allclose(pert.delta, jnp.clip(x + eta + eps * jnp.sign(g), 0, 1) - x,
                             atol=1e-6)
  assert float(jnp.max(jnp.abs(pert.delta))) > 1.5 * eps  # no eps-ball projection
  z_b, l_b = pert.aux
  np.testing.assert_allclose(z_b, logits_fn(x + eta), rtol=1e-6)
  np.testing.assert_allclose(l_b, losses.cross_entropy(logits_fn(x + eta), y), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# TRADES


def _np_kl(p_logits, q_logits):
  p_logits, q_logits = np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64)
  lp = p_logits - np.log(np.exp(p_logits).sum(1, keepdims=True))
  lq = q_logits - np.log(np.exp(q_logits).sum(1, keepdims=True))
  return (np.exp(lp) * (lp - lq)).sum(1)


def test_trades_kl_and_regularizer_match_numpy_with_gradients_through_both_outputs():
  w, x, y, forward = _linear()
  rng = np.random.default_rng(1)
  delta = jnp.asarray(rng.uniform(-0.1, 0.1, x.shape), jnp.float32)
  a, b = forward(w, x)[0], forward(w, x + delta)[0]
  np.testing.assert_allclose(losses.kl_divergence(a, b), _np_kl(a, b), rtol=1e-5, atol=1e-6)
  args = trades.TRADESArgs()

  def reg(params):
    clean = forward(params, x)[0]
    return trades.regularizer(_reg_inputs(args, forward, params, x, y, delta, clean)).local

  assert float(reg(w)) == pytest.approx(6.0 * _np_kl(a, b).mean(), rel=1e-5)
  # The authors' KLDivLoss(log_softmax(f(x')), softmax(f(x))) differentiates through both.
  def reference(params):
    lp = jax.nn.log_softmax(forward(params, x)[0])
    lq = jax.nn.log_softmax(forward(params, x + delta)[0])
    return 6.0 * jnp.sum(jnp.exp(lp) * (lp - lq)) / N

  def clean_fixed(params):
    lp = jax.lax.stop_gradient(jax.nn.log_softmax(forward(params, x)[0]))
    lq = jax.nn.log_softmax(forward(params, x + delta)[0])
    return 6.0 * jnp.sum(jnp.exp(lp) * (lp - lq)) / N

  np.testing.assert_allclose(jax.grad(reg)(w), jax.grad(reference)(w), rtol=1e-4, atol=1e-7)
  assert _max_rel_err(jax.grad(reference)(w), jax.grad(clean_fixed)(w)) > 1e-2


def _trades_by_hand(logits_fn, x, keys, eps, steps, step_size, noise=0.001):
  """The authors' perturb loop (trades.py), written out."""
  clean = logits_fn(x)
  x_adv = x + noise * jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
  for _ in range(steps):
    g = jax.grad(lambda z: jnp.sum(losses.kl_divergence(clean, logits_fn(z))))(x_adv)
    x_adv = x_adv + step_size * jnp.sign(g)
    x_adv = jnp.minimum(jnp.maximum(x_adv, x - eps), x + eps)
    x_adv = jnp.clip(x_adv, 0.0, 1.0)
  return x_adv - x


def test_trades_attack_follows_the_authors_loop_and_raises_the_kl():
  w, x, y, forward = _linear()
  logits_fn = lambda z: forward(w, z)[0]  # noqa: E731
  keys = randomness.example_keys(jax.random.key(2), jnp.arange(N))
  eps = 0.031
  kl = lambda d: np.asarray(losses.kl_divergence(logits_fn(x), logits_fn(x + d)))  # noqa: E731
  prev = kl(trades.gaussian_start(keys, x, 0.001))
  for steps in (1, 3, 10):
    args = trades.TRADESArgs(steps=steps)
    delta = trades.kl_attack(logits_fn, x, eps, args, keys)
    np.testing.assert_allclose(delta, _trades_by_hand(logits_fn, x, keys, eps, steps, 0.007),
                               atol=1e-6)
    assert float(jnp.max(jnp.abs(delta))) <= eps + 1e-6
    now = kl(delta)
    assert np.all(now > prev)  # every example's KL rose
    prev = now


def _bn_model():
  """A BatchNorm CNN whose running statistics are far from any batch's: eval mode and train
  mode give different logits (and different attacks)."""
  model = models.SmallCNN(num_classes=C, width=4, use_batch_norm=True)
  x = jax.random.uniform(jax.random.key(0), (N, 12, 12, 1), minval=0.1, maxval=0.9)
  v = model.init(jax.random.key(1), x, train=False)
  stats = jax.tree.map(lambda s: s + 0.7, v["batch_stats"])  # mean 0.7, var 1.7
  v = {"params": v["params"], "batch_stats": stats}
  y = jnp.arange(N, dtype=jnp.int32) % C

  def train_logits(z):
    return model.apply(v, z, train=True, mutable=["batch_stats"])[0]

  def eval_logits(z):
    return model.apply(v, z, train=False)

  assert _max_rel_err(train_logits(x), eval_logits(x)) > 0.05
  return x, y, train_logits, eval_logits


def _attack_inputs(name, x, y, train_logits, eval_logits, eps, args=None):
  m = methods.get(name)
  keys = randomness.example_keys(jax.random.key(5), jnp.arange(x.shape[0]))
  loss_fn = lambda z: losses.cross_entropy(train_logits(z), y)  # noqa: E731
  return AttackInputs(args or m.default_args(), loss_fn, train_logits, x, y, keys,
                      jnp.float32(eps), None, m.default_init, jnp.int32(0), jnp.float32(0.5),
                      None, eval_logits_fn=eval_logits, label_smoothing=0.4)


def test_trades_attacks_the_eval_mode_model():
  x, y, train_logits, eval_logits = _bn_model()
  eps, args = 0.1, trades.TRADESArgs(steps=3)
  inp = _attack_inputs("trades", x, y, train_logits, eval_logits, eps, args)
  delta = methods.get("trades").perturb(inp).delta
  by_hand = _trades_by_hand(eval_logits, x, inp.keys, eps, 3, args.alpha * eps)
  np.testing.assert_allclose(delta, by_hand, atol=1e-6)
  train_mode = _trades_by_hand(train_logits, x, inp.keys, eps, 3, args.alpha * eps)
  assert float(jnp.mean(jnp.abs(by_hand - train_mode) > 1e-3)) > 0.05


# ---------------------------------------------------------------------------------------------
# PGD-AT (the benchmark's)


def test_pgd_at_is_plain_ce_pgd_on_the_eval_mode_model():
  x, y, train_logits, eval_logits = _bn_model()
  eps = 0.1
  args = methods.get("pgd_at").make_args({"steps": 3})
  inp = _attack_inputs("pgd_at", x, y, train_logits, eval_logits, eps, args)
  assert inp.init == "uniform"
  delta = methods.get("pgd_at").perturb(inp).delta
  delta0 = attacks.init_delta("uniform", inp.keys, x, eps)
  eval_ce = lambda z: losses.cross_entropy(eval_logits(z), y)  # noqa: E731
  np.testing.assert_allclose(delta, attacks.pgd(eval_ce, x, eps, eps / 4, 3, delta0), atol=1e-6)
  train_ce = lambda z: losses.cross_entropy(train_logits(z), y)  # noqa: E731
  train_mode = attacks.pgd(train_ce, x, eps, eps / 4, 3, delta0)
  assert float(jnp.mean(jnp.abs(delta - train_mode) > 1e-3)) > 0.05


def test_pgd_at_on_a_linear_model_is_the_closed_form_worst_case():
  """Two classes, logits x.w_c: the CE's input gradient has the sign of (w_1 - w_0) for label 0
  and the opposite for label 1, everywhere; 10 steps of eps/4 from any start in the ball reach
  that vertex. The attack's CE is its own (the method's loss_fn here ascends the opposite)."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(2, int(np.prod(D)))), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(N,) + D), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, N), jnp.int32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w.T  # noqa: E731
  inp = _attack_inputs("pgd_at", x, y, logits_fn, logits_fn, 0.03)
  inp = inp._replace(loss_fn=lambda z: -losses.cross_entropy(logits_fn(z), y))
  delta = methods.get("pgd_at").perturb(inp).delta
  g_sign = (jnp.sign(w[1] - w[0]).reshape(D)[None]
            * jnp.where(y == 0, 1.0, -1.0)[:, None, None, None])
  np.testing.assert_allclose(delta, 0.03 * g_sign, atol=1e-7)


def test_pgd_keeps_its_args_and_start():
  pgd = methods.get("pgd")
  assert pgd.default_init == "zero"
  assert (pgd.default_args().steps, pgd.default_args().alpha) == (10, 0.2)
  assert methods.presets()["pgd_at"] == ("pgd_at", {})


# ---------------------------------------------------------------------------------------------
# N devices == 1 device


def _steps_from_common_states(config, steps=2):
  """`steps` steps on 1 and on N_DEV devices, each step starting both from the 1-device state
  (test_train_step's batches and key), so that a sign step does not amplify the float-rounding
  differences of an earlier step's two updates (~1e-6 relative) from one step to the next."""
  model = model_config.create_model(config, 10, bn_axis_name=parallel.AXIS)
  start = ts.create_train_state(config, model, jax.random.key(0), (28, 28, 1), 10,
                                n_examples=N_EXAMPLES)
  fns = {n: parallel.pmap_train_step(train_step.make_train_step(config, model, 10),
                                     devices=jax.local_devices()[:n]) for n in (1, N_DEV)}
  out = []
  for i in range(steps):
    now = {}
    for n, fn in fns.items():
      batch = {k: v.reshape((n, -1) + v.shape[1:]) for k, v in _batch(seed=i).items()}
      rstate, m = fn(parallel.replicate(start, n), batch, jax.random.key(42))
      now[n] = (parallel.unreplicate(rstate), jax.tree.map(lambda v: float(v[0]), m))
    out.append(now)
    start = now[1][0]
  return out


@pytest.mark.parametrize("method,extra", [
    # A step of 16 eps (to the box's faces) makes some examples abnormal on the untrained
    # model, so the global sets, counts and means are exercised (at alpha 1 none is abnormal).
    ("n_aaer", {"method_args": {"n_aaer": {"alpha": 16.0}}}),
    # TRADES' KL gradient at its 0.001 start is ~1e-5 per pixel, where the eval-mode forward's
    # float32 rounding, which depends on the per-device batch size (~4e-7 on the logits here),
    # can flip the sign of a near-zero entry: a start of 0.03 keeps the signs well defined.
    ("trades", {"method_args": {"trades": {"steps": 2, "noise": 0.03}}}),
    ("pgd_at", {"method_args": {"pgd_at": {"steps": 2}}}),
])
def test_pmapped_step_equals_single_device_step(method, extra):
  assert jax.local_device_count() >= N_DEV, "conftest sets JAX_NUM_CPU_DEVICES=8"
  c = tiny_config(method=method, crop_padding=2, flip=True, batch_size=16, **extra)
  init = ts.create_train_state(c, model_config.create_model(c, 10, bn_axis_name=parallel.AXIS),
                               jax.random.key(0), (28, 28, 1), 10, n_examples=N_EXAMPLES)
  regs = []
  for now in _steps_from_common_states(c):
    (one, m1), (many, m8) = now[1], now[N_DEV]
    for a, b in zip(jax.tree.leaves((one.params, one.batch_stats)),
                    jax.tree.leaves((many.params, many.batch_stats))):
      # rtol 1e-5, with float32 summation-order noise allowed on a leaf's near-zero entries
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(a))))
    for k in m1:
      assert m1[k] == pytest.approx(m8[k], rel=DEVICE_SPLIT_RTOL, abs=1e-7), k
    regs.append(m1.get("train_method_reg", 0.0))
  assert _max_rel_err(one.params, init.params) > 1e-4  # it trained
  if method in ("n_aaer", "trades"):  # the method's own term was on
    assert max(regs) > 0, regs
