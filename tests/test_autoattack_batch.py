"""AutoAttack's batch-dependence check: a model whose logits depend on the other points in the
batch (BatchNorm in train mode, a batch mean) is flagged, through `evaluate` and the Evaluator;
the same models in eval mode are not."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import autoattack, models
from fastadv_jax.training import evaluation

EPS = 0.03
WARNING = "depend on the batch"


class _BNNet(nn.Module):
  batch_stats_from_batch: bool  # BatchNorm(use_running_average=False): train-mode statistics

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3, 3))(x)
    h = nn.relu(nn.BatchNorm(use_running_average=not self.batch_stats_from_batch)(h))
    return nn.Dense(5)(h.reshape(h.shape[0], -1))


class _BatchMeanNet(nn.Module):
  """Subtracts the batch mean of its features: a cross-example interaction without BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Conv(4, (3, 3))(x))
    h = h - jnp.mean(h, axis=0, keepdims=True)
    return nn.Dense(5)(h.reshape(h.shape[0], -1))


def _points(n=24, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, 8, 8, 1)).astype(np.float32)


def _run(logits_fn, x):
  y = np.asarray(np.argmax(logits_fn(x), -1))
  return autoattack.evaluate(logits_fn, x, y, EPS, "apgd-ce", progress=False, apgd_steps=2)


def test_batchnorm_in_train_mode_is_flagged_and_eval_mode_is_not():
  x = _points()
  train_mode = _BNNet(True)
  variables = train_mode.init(jax.random.key(0), x[:4])
  res = _run(lambda z: train_mode.apply(variables, z, mutable=["batch_stats"])[0], x)
  flagged = [m for m in res.warnings if WARNING in m]
  assert len(flagged) == 1 and "BatchNorm in train mode?" in flagged[0]
  eval_mode = _BNNet(False)
  res = _run(lambda z: eval_mode.apply(variables, z), x)
  assert not any(WARNING in m for m in res.warnings)


def test_a_batch_mean_is_flagged_a_linear_model_is_not():
  x = _points()
  w = np.random.default_rng(1).normal(size=(64, 5)).astype(np.float32)
  linear = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
  centred = lambda z: linear(z) - jnp.mean(linear(z), axis=0)  # noqa: E731
  assert any(WARNING in m for m in _run(centred, x).warnings)
  assert not any(WARNING in m for m in _run(linear, x).warnings)


def test_the_evaluator_path_checks_the_batch_too():
  """The CLI's path (Evaluator.autoattack, models in eval mode): the library's small CNN passes,
  a module with a batch-mean interaction is flagged."""
  images = np.asarray(_points(16) * 255, np.uint8)
  for model, flagged in ((models.SmallCNN(num_classes=5, width=4), False), (_BatchMeanNet(), True)):
    variables = model.init(jax.random.key(0), images[:2].astype(np.float32) / 255, train=False)
    labels = np.asarray(np.argmax(model.apply(variables, images / 255.0, train=False), -1))
    ev = evaluation.Evaluator(model, batch_size=16)
    res = ev.autoattack(variables, images, labels, EPS, "apgd-ce", progress=False)
    assert any(WARNING in m for m in res.warnings) == flagged
    assert (WARNING in " ".join(res.summary()["autoattack_warnings"])) == flagged
