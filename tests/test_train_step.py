"""The pmapped train step: N devices == 1 device, bfloat16 close to float32, Free-AT carry."""
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
