"""The pmapped train step: N devices == 1 device for every method (those with run-level or
per-example state too), bfloat16 close to float32, Free-AT carry."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fastadv_jax import parallel
from fastadv_jax.training import model_config, train_step
from fastadv_jax.training import train_state as ts

N_DEV = 8


N_EXAMPLES = 40  # a training set of 40 examples, for methods with per-example state


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
          "label": rng.integers(0, 10, (n,)).astype(np.int32),
          # positions in the training set: batches overlap, so rows are read after a write
          "index": np.sort(rng.permutation(N_EXAMPLES)[:n]).astype(np.int32)}


def _run(config, n_dev, steps=2, half=None):
  """`steps` steps on fixed random batches (a new batch each step)."""
  model = model_config.create_model(config, 10, bn_axis_name=parallel.AXIS, half_precision=half)
  state = ts.create_train_state(config, model, jax.random.key(0), (28, 28, 1), 10,
                                n_examples=N_EXAMPLES)
  fn = parallel.pmap_train_step(train_step.make_train_step(config, model, 10),
                                  devices=jax.local_devices()[:n_dev])
  rstate = parallel.replicate(state, n_dev)
  metrics = []
  for i in range(steps):
    batch = {k: v.reshape((n_dev, -1) + v.shape[1:]) for k, v in _batch(seed=i).items()}
    rstate, m = fn(rstate, batch, jax.random.key(42))
    metrics.append(jax.tree.map(lambda v: float(v[0]), m))
  return parallel.unreplicate(rstate), metrics, state


# The tolerance of a 1-device against an N-device run of a few training steps. Both compute the
# same float32 arithmetic except the order of the sums over examples: the batch means of the
# gradients and of the BatchNorm statistics (16 examples: one sum on 1 device; 8 partial sums,
# then a sum across devices, on 8). A float32 sum of n terms is off by at most (n - 1) eps
# relative to the sum of their magnitudes, eps = 2^-23; a step nests up to 8 such means (the
# attack's input gradients, GradAlign's double backpropagation, the method's regulariser, the
# weight gradient) and the second step starts from the first one's rounding, so the bound used
# is 2 steps x 8 means x 16 terms = 256 eps (3.05e-5), relative to a tensor's largest entry.
F32_EPS = float(np.finfo(np.float32).eps)
DEVICE_SPLIT_RTOL = 2 * 8 * 16 * F32_EPS


def _max_rel_err(a, b):
  return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / (np.max(np.abs(u)) + 1e-12))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("method,lam,extra", [
    ("fgsm", 0.5, {}),
    ("fgsm", 0.5, {"grad_align_derivative": "jvp"}),
    ("fgsm_rs", 0.5, {"grad_align_backprop_g1": True}),
    ("pgd", 0.0, {"method_args": {"pgd": {"steps": 2}}}),
    ("free", 0.0, {"method_args": {"free": {"replay": 2}}}),
    ("standard", 0.0, {}),
    ("nfgsm", 0.5, {}),
    ("zerograd", 0.0, {}),
    ("multigrad", 0.0, {}),
    ("elle", 0.0, {"method_args": {"elle": {"lam": 10.0}}}),
    ("elle_a", 0.0, {}),
    ("gat", 0.0, {}),
    ("nuat", 0.0, {"method_args": {"nuat": {"ramp": 0.05}}}),
    # Run-level method state. The benchmark's label smoothing 0.4, except for CUAP: on these
    # batches, with 0.4, one CUAP example's second-step input gradient crosses a ReLU / max-pool
    # tie at float32 rounding, so its FGSM signs (and then the weights, by 0.5 %) differ between
    # the two device counts; a discontinuity of any sign step, not of the method.
    ("liet", 0.0, {"label_smoothing": 0.4}),
    ("fgsm_uap", 0.0, {"label_smoothing": 0.4}),
    ("fgsm_cuap", 0.0, {"label_smoothing": 0.0}),
    ("fgsm_fuap", 0.0, {"label_smoothing": 0.4}),
])
def test_pmapped_step_equals_single_device_step(method, lam, extra):
  assert jax.local_device_count() >= N_DEV, "conftest sets JAX_NUM_CPU_DEVICES=8"
  c = tiny_config(method=method, grad_align_lambda=lam, crop_padding=2, flip=True,
                  batch_size=16, **extra)
  one, m1, _ = _run(c, 1)
  many, m8, init = _run(c, N_DEV)
  # Parameters and BatchNorm statistics agree, and they did move.
  assert (_max_rel_err((one.params, one.batch_stats), (many.params, many.batch_stats))
          < DEVICE_SPLIT_RTOL)
  assert _max_rel_err(one.params, init.params) > 1e-4
  for a, b in zip(m1, m8):
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=DEVICE_SPLIT_RTOL)
    assert a["train_reg"] == pytest.approx(b["train_reg"], rel=DEVICE_SPLIT_RTOL, abs=1e-7)
  if lam > 0:
    assert m1[0]["train_reg"] > 0
  if method == "free":
    np.testing.assert_allclose(one.carried_delta, many.carried_delta, atol=1e-6)
  if method in ("elle", "elle_a", "gat", "nuat"):  # the method's own term is on and agrees
    for a, b in zip(m1, m8):
      assert a["train_method_reg"] == pytest.approx(
          b["train_method_reg"], rel=DEVICE_SPLIT_RTOL, abs=1e-7)
    assert max(a["train_method_reg"] for a in m1) > 0 or method == "elle_a"
  if method == "elle_a":  # the error statistics (lambda stays 0 without a spike in 2 steps)
    for k in ("n", "mean", "m2"):
      assert float(one.method_state[k]) == pytest.approx(
          float(many.method_state[k]), rel=DEVICE_SPLIT_RTOL)
    assert float(one.method_state["n"]) == 2 and float(one.method_state["mean"]) > 0
  if method in ("liet", "fgsm_uap", "fgsm_cuap", "fgsm_fuap"):  # its term and its state agree
    for a, b in zip(m1, m8):
      for k in ("train_ce", "train_method_reg"):
        assert a[k] == pytest.approx(b[k], rel=DEVICE_SPLIT_RTOL, abs=1e-7), k
    assert m1[-1]["train_method_reg"] > 0
    for a, b in zip(jax.tree.leaves(one.method_state), jax.tree.leaves(many.method_state)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(np.abs(np.asarray(v)).max() > 0 for v in jax.tree.leaves(one.method_state))


def test_bfloat16_step_runs_and_stays_close_to_float32():
  c = tiny_config(method="fgsm", grad_align_lambda=0.5)
  f32, m32, init = _run(c, 1, steps=1, half=False)
  b16, m16, _ = _run(c, 1, steps=1, half=True)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(b16.params))
  assert m16[0]["train_loss"] == pytest.approx(m32[0]["train_loss"], rel=0.05)
  u32 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(f32.params),
                                                        jax.tree.leaves(init.params))])
  u16 = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(b16.params),
                                                        jax.tree.leaves(init.params))])
  cos = u32 @ u16 / (np.linalg.norm(u32) * np.linalg.norm(u16))
  assert cos > 0.95, cos  # the bf16 update points where the f32 update does


def test_free_at_carries_the_perturbation_inside_the_ball():
  c = tiny_config(method="free", eps=0.1, method_args={"free": {"replay": 4, "alpha": 1.0}})
  state, _, _ = _run(c, 2, steps=3)
  d = np.asarray(state.carried_delta)
  assert d.shape == (16, 28, 28, 1)
  assert np.abs(d).max() <= 0.1 + 1e-6 and np.abs(d).max() > 0.09  # moved to the ball's edge


def test_gradalign_off_means_no_regulariser():
  c = tiny_config(method="fgsm", grad_align_lambda=0.0)
  _, m, _ = _run(c, 1, steps=1)
  assert m[0]["train_reg"] == 0.0 and m[0]["finite"] == 1.0
  assert m[0]["train_loss"] == pytest.approx(m[0]["train_ce"])


def test_pmapped_step_compiles_once():
  """The replicated state sits where the step puts its outputs, so call 2 reuses call 1's
  program (with a host-placed state, pmap traced and compiled the step a second time)."""
  c = tiny_config()
  model = model_config.create_model(c, 10, bn_axis_name=parallel.AXIS)
  state = ts.create_train_state(c, model, jax.random.key(0), (28, 28, 1), 10)
  fn = parallel.pmap_train_step(train_step.make_train_step(c, model, 10),
                                  devices=jax.local_devices()[:2])
  rstate = parallel.replicate(state, 2)
  compiles = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    counts = []
    for i in range(3):
      batch = {k: v.reshape((2, -1) + v.shape[1:]) for k, v in _batch(seed=i).items()}
      rstate, m = fn(rstate, batch, jax.random.key(0))
      jax.block_until_ready(m)
      counts.append(len(compiles))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert counts[0] >= 1, "the first call compiles (the listener must see it)"
  assert counts[1] == counts[0] and counts[2] == counts[0], counts


def test_many_steps_on_8_devices_stay_within_rounding_of_1_device():
  """Over 30 steps the two runs differ only by float32 rounding of the cross-device sums (and of
  kernels chosen for other per-device batch sizes), which training then carries along: measured
  ~6e-7 relative after 1 step and ~5e-6 after 30-40 (lr 0.05). A systematic error (a wrong
  scaling of one device's share, a missing pmean) shows up at 1e-3 or more within a step."""
  c = tiny_config(method="fgsm", grad_align_lambda=0.5, lr_schedule="constant", lr_max=0.05,
                  crop_padding=2, flip=True)
  one, _, _ = _run(c, 1, steps=30)
  many, _, _ = _run(c, N_DEV, steps=30)
  err = _max_rel_err((one.params, one.batch_stats), (many.params, many.batch_stats))
  assert err < 5e-5, err


# --- N-AAER, TRADES and PGD-AT: each step from the 1-device state ---------------------------------

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
def test_pmapped_step_equals_single_device_step_from_common_states(method, extra):
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


# --- FGSM-PGI and FGSM-PCO: per-example state -----------------------------------------------------

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
def test_pmapped_step_equals_single_device_step_with_example_state(method, extra):
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
