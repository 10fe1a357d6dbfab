"""Attacks: constraints, the known worst case of a linear model, restarts, evaluation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import attacks, losses, models
from fastadv_jax.training import evaluation


def _model_and_loss(seed=0):
  model = models.SmallCNN(num_classes=10, width=4, use_batch_norm=True)
  x = jax.random.uniform(jax.random.key(seed), (16, 12, 12, 1))
  x = x.at[:, :3].set(0.0).at[:, -3:].set(1.0)  # pixels on both box boundaries
  v = model.init(jax.random.key(1), x, train=False)
  y = jnp.argmax(model.apply(v, x, train=False), -1)  # all clean points correct
  loss_fn = lambda z: losses.cross_entropy(model.apply(v, z, train=False), y)  # noqa: E731
  return model, v, x, y, loss_fn


@pytest.mark.parametrize("init", ["zero", "uniform", "corner"])
def test_fgsm_and_pgd_respect_eps_and_box(init):
  _, _, x, _, loss_fn = _model_and_loss()
  eps = 0.1
  keys = jax.random.split(jax.random.key(3), x.shape[0])
  delta0 = attacks.init_delta(init, keys, x, eps)
  for delta in (delta0, attacks.fgsm(loss_fn, x, eps, 1.25 * eps, delta0)[0],
                attacks.pgd(loss_fn, x, eps, eps / 4, 5, delta0)):
    assert float(jnp.max(jnp.abs(delta))) <= eps + 1e-6
    assert float(jnp.min(x + delta)) >= 0.0 and float(jnp.max(x + delta)) <= 1.0
  if init == "corner":  # pixels at least eps inside the box sit exactly on a vertex
    free = (x >= eps) & (x <= 1 - eps)
    assert int(free.sum()) > 100
    np.testing.assert_allclose(jnp.abs(delta0)[free], eps, rtol=1e-6)


def test_linear_model_worst_case_is_eps_sign_w():
  """For loss = -y*w.x (increasing in -w.x), the L-inf worst case is -eps*sign(w)*y."""
  w = jax.random.normal(jax.random.key(0), (6, 6, 1))
  x = jnp.full((3, 6, 6, 1), 0.5)  # far from the box: only the eps-ball binds
  y = jnp.array([1.0, -1.0, 1.0])
  loss_fn = lambda z: -y * jnp.sum(z * w, axis=(1, 2, 3))  # noqa: E731
  eps = 0.03
  expected = -eps * jnp.sign(w)[None] * y[:, None, None, None]
  d_fgsm, _ = attacks.fgsm(loss_fn, x, eps, eps, jnp.zeros_like(x))
  keys = jax.random.split(jax.random.key(1), 3)
  d_pgd = attacks.pgd(loss_fn, x, eps, eps / 4, 10, attacks.init_delta("uniform", keys, x, eps))
  np.testing.assert_allclose(d_fgsm, expected, atol=1e-7)
  np.testing.assert_allclose(d_pgd, expected, atol=1e-7)
  # PGD-corner of a uniform start with one tiny step lands on the same vertex.
  np.testing.assert_allclose(attacks.to_corner(d_pgd, x, eps), expected, atol=1e-7)


def test_restart_update_keeps_the_worst_case():
  y = jnp.array([0, 0, 0])
  carry = attacks.restarts_init(jnp.zeros((3, 1)), y, jnp.ones(3, bool))
  right = jnp.array([[5.0, 0.0]] * 3)
  wrong = jnp.array([[0.0, 5.0]] * 3)
  # restart 1: example 0 misclassified with low loss; others correct
  carry = attacks.restart_update(carry, jnp.array([[1.0], [1.0], [1.0]]),
                                 jnp.array([0.1, 2.0, 1.0]),
                                 jnp.stack([wrong[0], right[1], right[2]]), y)
  # restart 2: example 0 correct with high loss; example 1 higher loss (correct); 2 misclassified
  carry = attacks.restart_update(carry, jnp.array([[2.0], [2.0], [2.0]]),
                                 jnp.array([9.0, 3.0, 0.5]),
                                 jnp.stack([right[0], right[1], wrong[2]]), y)
  delta, _, robust = carry
  assert robust.tolist() == [False, True, False]
  assert delta[:, 0].tolist() == [1.0, 2.0, 2.0]  # misclassifying > highest loss


def test_more_restarts_never_raise_robust_accuracy():
  model, v, x, y, _ = _model_and_loss()
  ev = evaluation.Evaluator(model, batch_size=16)
  rng = jax.random.key(7)
  accs = [ev.robust_accuracy(v, np.asarray(x * 255, np.uint8), np.asarray(y), 0.05, 3, r, rng)
          for r in (1, 2, 4)]
  assert accs[0] >= accs[1] >= accs[2]
  assert accs[0] < 1.0  # the attack does something


def test_evaluator_matches_the_pure_attack_and_is_device_count_independent():
  model, v, x, y, _ = _model_and_loss()
  xu = np.asarray(x * 255, np.uint8)
  xf = xu.astype(np.float32) / 255
  rng = jax.random.key(5)
  one = evaluation.Evaluator(model, batch_size=16, devices=jax.local_devices()[:1])
  many = evaluation.Evaluator(model, batch_size=8, devices=jax.local_devices()[:8])
  acc1 = one.robust_accuracy(v, xu, np.asarray(y), 0.05, 3, 3, rng)
  acc8 = many.robust_accuracy(v, xu, np.asarray(y), 0.05, 3, 3, rng)
  from fastadv_jax import randomness
  keys = randomness.example_keys(rng, jnp.arange(16))
  loss_and_logits = lambda z: (losses.cross_entropy(model.apply(v, z, train=False), y),  # noqa
                               model.apply(v, z, train=False))
  robust, _ = attacks.pgd_with_restarts(loss_and_logits, jnp.asarray(xf), y, keys, 0.05, 0.0125,
                                        3, 3)
  assert acc1 == acc8 == pytest.approx(float(jnp.mean(robust)))


def test_clean_accuracy_is_the_models_accuracy_on_any_device_count():
  model, v, x, y, _ = _model_and_loss()
  xu = np.asarray(x * 255, np.uint8)[:13]  # 13: chunks padded to the device count
  yy = np.asarray(y)[:13]
  want = float(np.mean(np.argmax(model.apply(v, xu.astype(np.float32) / 255, train=False), -1)
                       == yy))
  for n_dev, bs in ((1, 16), (8, 8)):
    ev = evaluation.Evaluator(model, batch_size=bs, devices=jax.local_devices()[:n_dev])
    assert ev.clean_accuracy(v, xu, yy) == pytest.approx(want)
    assert ev.clean_accuracy(v, xu, yy) == pytest.approx(
        ev.robust_accuracy(v, xu, yy, 0.0, 1, 1, jax.random.key(0)))


def test_the_evaluator_refuses_points_outside_its_domain():
  """Float images already in [0, 1] would be divided by 255 again (a near-black image, a wrong
  accuracy); labels of another model would count as errors. Each is one ValueError line,
  from every public entry point."""
  model, v, x, y, _ = _model_and_loss()
  xu, yy = np.asarray(x * 255, np.uint8)[:8], np.asarray(y)[:8]
  ev = evaluation.Evaluator(model, batch_size=8)
  classes = int(model.apply(v, xu[:1].astype(np.float32), train=False).shape[-1])
  calls = {
      "clean_points": lambda a, b: ev.clean_points(v, a, b),
      "robust_points": lambda a, b: ev.robust_points(v, a, b, 0.05, 1, 1, jax.random.key(0)),
      "diagnostics": lambda a, b: ev.diagnostics(v, a, b, 0.05, jax.random.key(0), 1),
      "autoattack": lambda a, b: ev.autoattack(v, a, b, 0.05, "apgd-ce", progress=False),
  }
  wrong_label = np.where(np.arange(8) == 2, classes, yy)
  for call in calls.values():
    with pytest.raises(ValueError, match="takes uint8 images in \\[0, 255\\], got dtype "
                       "float32"):
      call(np.asarray(x)[:8], yy)
    with pytest.raises(ValueError, match=f"class indices in \\[0, {classes}\\) for this "
                       f"{classes}-class model, got {classes}"):
      call(xu, wrong_label)
    with pytest.raises(ValueError, match="one integer per image"):
      call(xu, yy.astype(np.float32))


def test_the_same_evaluation_of_other_weights_compiles_nothing_new():
  """A run evaluates its last, kept and averaged weights, which arrive as device 0's copy of
  the state, as host arrays and as freshly initialised arrays: the programs compiled for the
  first serve the others."""
  model, v, x, y, _ = _model_and_loss()
  xu, yy = np.asarray(x * 255, np.uint8), np.asarray(y)
  ev = evaluation.Evaluator(model, batch_size=8, devices=jax.local_devices()[:2])
  compiles = []

  def count(event, duration, **_):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  first = jax.device_put(v, jax.local_devices()[0])
  others = (jax.device_get(v), jax.tree.map(lambda a: a * 1.0, v))
  results = [ev.robust_accuracy(first, xu, yy, 0.05, 2, 2, jax.random.key(0))]
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    for other in others:
      results.append(ev.robust_accuracy(other, xu, yy, 0.05, 2, 2, jax.random.key(0)))
      results.append(ev.clean_accuracy(other, xu, yy))
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert results[1] == results[3] == results[0]  # the same weights, the same verdicts
  assert compiles == []


def test_evaluation_refuses_a_bfloat16_model():
  with pytest.raises(ValueError, match="float32"):
    evaluation.Evaluator(models.SmallCNN(dtype=jnp.bfloat16))
