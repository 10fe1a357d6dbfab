"""FGSM-PGI (MEP) and FGSM-PCO: their per-example buffers against a NumPy transcription of the
benchmark's update rules on a linear model, PGI's periodic reset, the regularisers' values and
gradients against finite differences, and N devices == 1 device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fastadv_jax import losses, methods, parallel, randomness
from fastadv_jax.methods import pco, pgi
from fastadv_jax.methods.base import AttackInputs, CELossInputs, RegularizerInputs
from fastadv_jax.training import model_config, train_step
from fastadv_jax.training import train_state as ts
from test_train_step import N_DEV, N_EXAMPLES, _batch, DEVICE_SPLIT_RTOL, _max_rel_err

N, D, C, EPS = 12, (4, 4, 3), 5, 0.1


# ---------------------------------------------------------------- a linear model, in NumPy too

def _np_logits(w, b, z):
  return z.reshape(z.shape[0], -1) @ w.T + b


def _np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_input_grad(w, b, z, targets):
  """grad_z sum_i CE(softmax(W z_i + b), t_i) = (p - t) W, per example."""
  return ((_np_softmax(_np_logits(w, b, z)) - targets) @ w).reshape(z.shape)


def _np_smoothed(y, s):
  return np.eye(C)[y] * (1 - s) + s / C


def _np_soft(y, target, s):
  onehot = np.eye(C)[y]
  t = onehot * target + (1 - onehot) * (1 - target) / (C - 1)
  return t * (1 - s) + s / C


def _np_proj(delta, x):
  return np.clip(np.clip(delta, -EPS, EPS), -x, 1 - x)


def _problem(seed):
  """Weights, and per step the batch's training-set positions and (augmented) images: step 0
  visits every example (the buffers' start), later steps overlapping subsets. Images include
  exact 0s and 1s so the box constraint binds."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(C, int(np.prod(D))))
  b = rng.normal(size=C)
  y_all = rng.integers(0, C, N)
  steps = []
  for k in range(3):
    idx = np.arange(N) if k == 0 else np.sort(rng.permutation(N)[:8])
    x = rng.uniform(0, 1, size=(len(idx),) + D)
    x[rng.uniform(size=x.shape) < 0.1] = 0.0
    x[rng.uniform(size=x.shape) < 0.1] = 1.0
    steps.append((idx, x, y_all[idx], w + 0.3 * k * rng.normal(size=w.shape), b))
  return steps


def _jax_linear(w, b):
  return lambda z: z.reshape(z.shape[0], -1) @ jnp.asarray(w).T + jnp.asarray(b)


def _inputs(args, w, b, x, y, rows, k, smoothing=0.0, attack_smoothing=0.0, epoch=0):
  logits_fn = _jax_linear(w, b)
  keys = randomness.example_keys(jax.random.key(100 + k), jnp.arange(x.shape[0]))
  return AttackInputs(args, lambda z: losses.cross_entropy(logits_fn(z), jnp.asarray(y),
                                                           attack_smoothing),
                      logits_fn, jnp.asarray(x), jnp.asarray(y), keys, jnp.asarray(EPS), None,
                      "zero", jnp.asarray(k), jnp.asarray(0.5), None, example_rows=rows,
                      epoch=epoch, label_smoothing=smoothing)


def _rows_of(table, idx):
  return None if table is None else jax.tree.map(lambda t: jnp.asarray(t[idx]), table)


def _store(table, idx, rows):
  rows = jax.tree.map(np.asarray, rows)
  if table is None:
    table = {k: np.zeros((N,) + v.shape[1:], v.dtype) for k, v in rows.items()}
  for k, v in rows.items():
    table[k][idx] = v
  return table


def _first_draw(inp):
  """The uniform noise the buffers start from (per-example keys of step 0)."""
  return np.asarray(randomness.uniform_like(inp.keys, inp.x, -1.0, 1.0))


# ------------------------------------------------------------------------------------- FGSM-PGI

def test_pgi_buffers_follow_the_benchmarks_update_rule(x64):
  args = methods.get("fgsm_pgi").default_args()
  s = 0.4  # the attack's label smoothing
  table, np_delta, np_mom = None, None, np.zeros((N,) + D)
  for k, (idx, x, y, w, b) in enumerate(_problem(0)):
    inp = _inputs(args, w, b, x, y, _rows_of(table, idx), k, attack_smoothing=s)
    if k == 0:  # the authors' reset: eps sign(U(-eps, eps)), momentum 0
      np_delta = np.clip(EPS * np.sign(_first_draw(inp)), -EPS, EPS)
    # The benchmark's loop body (fast_at/fgsm_pgi.py), transcribed.
    delta, momentum = np_delta[idx], np_mom[idx]
    adv = np.clip(x + delta, 0, 1)
    g = _np_input_grad(w, b, adv, _np_smoothed(y, s))
    momentum = g / np.abs(g).sum() + args.decay * momentum
    next_delta = _np_proj(delta + EPS * np.sign(momentum), x)
    delta = _np_proj(delta + EPS * np.sign(g), x)
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
    table = _store(table, idx, out.example_rows)
  assert moved_apart  # with a carried momentum the stored prior is not delta_adv


def test_pgi_with_decay_0_stores_delta_adv_the_ep_variant(x64):
  name, preset = methods.presets()["fgsm_ep"]
  args = methods.get(name).make_args(preset)
  table = None
  for k, (idx, x, y, w, b) in enumerate(_problem(1)):
    out = pgi.perturb(_inputs(args, w, b, x, y, _rows_of(table, idx), k))
    np.testing.assert_array_equal(out.example_rows["delta"], out.delta)
    table = _store(table, idx, out.example_rows)


def test_pgi_buffers_restart_every_reset_period(x64):
  steps = _problem(2)
  idx0, x0, y0, w0, b0 = steps[0]
  idx, x, y, w, b = steps[1]

  def after_epoch_0(args):
    return _store(None, idx0, pgi.perturb(_inputs(args, w0, b0, x0, y0, None, 0)).example_rows)

  for reset_every in (1, 2):
    args = methods.get("fgsm_pgi").make_args({"reset_every": reset_every})
    table = after_epoch_0(args)
    out = pgi.perturb(_inputs(args, w, b, x, y, _rows_of(table, idx), 1, epoch=1))
    fresh = pgi.perturb(_inputs(args, w, b, x, y, None, 1, epoch=1))  # a first visit
    np.testing.assert_array_equal(out.example_rows["period"], 1 // reset_every + 1)
    g = _np_input_grad(w, b, np.asarray(fresh.aux if reset_every == 1 else out.aux),
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


def _linear_forward(params, z):
  return z.reshape(z.shape[0], -1) @ params["w"].T + params["b"], None


def _fd_grad(f, w, b, h=1e-6):
  """Central finite differences of f(w, b) (NumPy, float64) in every entry of w and b."""
  out = []
  for arr, which in ((w, 0), (b, 1)):
    g = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
      plus, minus = [w.copy(), b.copy()], [w.copy(), b.copy()]
      plus[which][i] += h
      minus[which][i] -= h
      g[i] = (f(*plus) - f(*minus)) / (2 * h)
    out.append(g)
  return out


def _reg_inputs(args, params, x, y, delta, aux):
  keys = randomness.example_keys(jax.random.key(7), jnp.arange(x.shape[0]))
  return RegularizerInputs(args, _linear_forward, params, jnp.asarray(x), jnp.asarray(y),
                           jnp.asarray(delta), None, keys, jnp.asarray(EPS), None,
                           jnp.asarray(0.5), None, aux=None if aux is None else jnp.asarray(aux))


def test_pgi_regulariser_is_lam_mse_with_gradients_through_both_outputs(x64):
  idx, x, y, w, b = _problem(3)[1]
  rng = np.random.default_rng(3)
  delta = rng.choice([-EPS, EPS], size=x.shape)
  x0 = np.clip(x + rng.choice([-EPS, EPS], size=x.shape), 0, 1)
  args = methods.get("fgsm_pgi").default_args()

  def np_loss(w_, b_):  # lam * torch MSELoss(f(x + delta), f(x0)): mean over batch x classes
    return args.lam * np.mean((_np_logits(w_, b_, x + delta) - _np_logits(w_, b_, x0)) ** 2)

  def jax_loss(params):
    inp = _reg_inputs(args, params, x, y, delta, x0)
    logits, _ = _linear_forward(params, inp.x + inp.delta)
    out = pgi.regularizer(inp._replace(logits=logits))
    return out.local, out.value

  params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
  (local, value), grads = jax.value_and_grad(jax_loss, has_aux=True)(params)
  assert float(value) == pytest.approx(np_loss(w, b), rel=1e-12) and float(local) == float(value)
  fd_w, fd_b = _fd_grad(np_loss, w, b)
  np.testing.assert_allclose(grads["w"], fd_w, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(grads["b"], fd_b, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------- FGSM-PCO

def _np_pco(w, b, x, y, delta, args, s):
  """The benchmark's FGSM-PCO loop body (fast_at/fgsm_pco.py) up to X_new: (delta_FGSM, X_new)."""
  ori = _np_logits(w, b, x + delta)
  conf = np.clip(1 - _np_softmax(ori)[np.arange(len(y)), y], 0, 1)[:, None, None, None]
  g = _np_input_grad(w, b, x + delta, _np_soft(y, args.target, s))
  delta_fgsm = _np_proj(delta + EPS * np.sign(g), x)
  x_new = conf * (x + delta) + (1 - conf) * (x + args.beta * delta_fgsm)
  return delta_fgsm, x_new


def test_pco_buffer_and_mixture_follow_the_benchmarks_update_rule(x64):
  args = methods.get("fgsm_pco").default_args()
  s = 0.4  # the benchmark's smoothing on top of the 0.6 soft targets
  table, np_delta = None, None
  for k, (idx, x, y, w, b) in enumerate(_problem(4)):
    inp = _inputs(args, w, b, x, y, _rows_of(table, idx), k, smoothing=s)
    if k == 0:
      np_delta = np.clip(EPS * np.sign(_first_draw(inp)), -EPS, EPS)
    delta_bar = np_delta[idx]
    delta_fgsm, x_new = _np_pco(w, b, x, y, delta_bar, args, s)
    np_delta[idx] = delta_fgsm

    out = pco.perturb(inp)
    np.testing.assert_allclose(out.aux, delta_bar, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.delta, delta_fgsm, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out.example_rows["delta"], delta_fgsm, rtol=0, atol=1e-12)
    params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
    mixed, z0 = pco.mixture(_reg_inputs(args, params, x, y, out.delta, out.aux))
    np.testing.assert_allclose(mixed, x_new, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(z0, _np_logits(w, b, x + delta_bar), rtol=1e-12)
    table = _store(table, idx, out.example_rows)


def test_pco_soft_targets_are_the_authors_then_pytorchs_smoothing():
  t = np.asarray(pco.soft_targets(jnp.array([2]), 10, 0.6))
  np.testing.assert_allclose(t[0], [0.4 / 9] * 2 + [0.6] + [0.4 / 9] * 7, rtol=1e-6)
  ts_ = np.asarray(pco.soft_targets(jnp.array([2]), 10, 0.6, 0.4))
  assert ts_[0, 2] == pytest.approx(0.6 * 0.6 + 0.04) and ts_[0, 0] == pytest.approx(
      0.6 * 0.4 / 9 + 0.04)


@pytest.mark.parametrize("s", [0.0, 0.4])
def test_pco_loss_matches_numpy_with_gradients_through_c(x64, s):
  idx, x, y, w, b = _problem(5)[1]
  rng = np.random.default_rng(5)
  delta_bar = rng.choice([-EPS, EPS], size=x.shape)
  args = methods.get("fgsm_pco").default_args()
  delta, _ = _np_pco(w, b, x, y, delta_bar, args, s)  # the attack's output, fixed in the loss
  t = _np_soft(y, args.target, s)

  def np_loss(w_, b_, c_weights=None):
    """Soft CE at X_new + lam |MSE(f(x + delta), z0) - MSE(f(x + delta), f(X_new))|; c from
    the weights `c_weights` (default: those differentiated, as the authors' undetached c)."""
    cw = (w_, b_) if c_weights is None else c_weights
    z0 = _np_logits(w_, b_, x + delta_bar)
    c = np.clip(1 - _np_softmax(_np_logits(*cw, x + delta_bar))[np.arange(len(y)), y], 0, 1)
    c = c[:, None, None, None]
    out = _np_logits(w_, b_, c * (x + delta_bar) + (1 - c) * (x + args.beta * delta))
    adv = _np_logits(w_, b_, x + delta)
    ce = np.mean(-np.sum(t * np.log(_np_softmax(out)), -1))
    return ce + args.lam * abs(np.mean((adv - z0) ** 2) - np.mean((adv - out) ** 2))

  def jax_loss(params):
    inp = _reg_inputs(args, params, x, y, delta, delta_bar)
    x_new, z0 = pco.mixture(inp)
    logits, _ = _linear_forward(params, x_new)
    ce = jnp.mean(pco.train_ce(CELossInputs(args, logits, inp.y, inp.keys, s)))
    reg = pco.regularizer(inp._replace(logits=logits, ce_aux=z0))
    return ce + reg.local, reg.value

  params = {"w": jnp.asarray(w), "b": jnp.asarray(b)}
  (loss, reg_value), grads = jax.value_and_grad(jax_loss, has_aux=True)(params)
  assert float(loss) == pytest.approx(np_loss(w, b), rel=1e-12)
  assert float(reg_value) > 0
  fd_w, fd_b = _fd_grad(np_loss, w, b)
  np.testing.assert_allclose(grads["w"], fd_w, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(grads["b"], fd_b, rtol=1e-6, atol=1e-8)
  # The path through c matters: with c held fixed the gradient is another one.
  fixed_w, _ = _fd_grad(lambda w_, b_: np_loss(w_, b_, (w, b)), w, b)
  assert np.max(np.abs(fixed_w - fd_w)) > 1e-3 * np.max(np.abs(fd_w))


# ----------------------------------------------------------------- the pmapped step: 8 == 1

def _step_fns(config):
  model = model_config.create_model(config, 10, bn_axis_name=parallel.AXIS)
  state = ts.create_train_state(config, model, jax.random.key(0), (28, 28, 1), 10,
                                n_examples=N_EXAMPLES)
  step = train_step.make_train_step(config, model, 1)  # one step per epoch: resets can fire
  return state, {n: parallel.pmap_train_step(step, devices=jax.local_devices()[:n])
                 for n in (1, N_DEV)}


def _one_step(fn, state, n_dev, i):
  batch = {k: v.reshape((n_dev, -1) + v.shape[1:]) for k, v in _batch(seed=i).items()}
  new, m = fn(parallel.replicate(state, n_dev), batch, jax.random.key(42))
  return parallel.unreplicate(new), jax.tree.map(lambda v: float(v[0]), m)


@pytest.mark.parametrize("method,extra", [
    ("fgsm_pgi", {"method_args": {"fgsm_pgi": {"reset_every": 2}}}),
    ("fgsm_pco", {"label_smoothing": 0.4}),
])
def test_pmapped_step_equals_single_device_step(method, extra):
  """Each of 3 steps from the same state on 1 and 8 devices (batches overlap, so rows written
  by one step are read by the next). Steps are compared one at a time from the 1-device state:
  over several steps float32 rounding of the cross-device sums can flip the sign of a
  near-zero input-gradient entry, a discrete change in a stored row that is not an error.
  FGSM-PCO's regulariser is a difference of two MSEs, whose cancellation magnifies the relative
  rounding error (measured 3e-5 here); a per-device instead of a global mean is off by far more.

  FGSM-PGI with one step per epoch and a reset every 2 epochs: a batch's stored momentum rows
  are g / ||g||_1 of its own step, summing to 1 in L1, in epochs 0 and 2 (fresh periods); in
  epoch 1 the rows visited before carry 0.3 x their old momentum."""
  c = tiny_config(method=method, crop_padding=2, flip=True, **extra)
  state, fns = _step_fns(c)
  rel = 1e-5 if method == "fgsm_pgi" else 1e-4
  for i in range(3):
    one, m1 = _one_step(fns[1], state, 1, i)
    many, m8 = _one_step(fns[N_DEV], state, N_DEV, i)
    assert (_max_rel_err((one.params, one.batch_stats), (many.params, many.batch_stats))
            < DEVICE_SPLIT_RTOL)
    assert _max_rel_err(one.params, state.params) > 1e-4
    for k in ("train_loss", "train_ce", "train_method_reg"):
      assert m1[k] == pytest.approx(m8[k], rel=rel), k
    assert m1["train_method_reg"] > 0
    for k in one.example_state:
      np.testing.assert_allclose(one.example_state[k], many.example_state[k], rtol=1e-5,
                                 atol=1e-9, err_msg=f"{k}, step {i}")
    idx = _batch(seed=i)["index"]
    assert np.all(np.abs(one.example_state["delta"][idx]).max(axis=1) > 0)  # flat rows
    if method == "fgsm_pgi":
      np.testing.assert_array_equal(one.example_state["period"][idx, 0], i // 2 + 1)
      l1 = float(np.abs(one.example_state["momentum"][idx]).sum())
      if i == 1:
        assert abs(l1 - 1.0) > 1e-3
      else:
        assert l1 == pytest.approx(1.0, rel=1e-5)
    state = one
