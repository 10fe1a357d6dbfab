"""Shared cases of tests/methods/ (test_aaer.py, test_trades.py, test_pgd.py): small models and
inputs."""
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import losses, methods, models, randomness
from fastadv_jax.methods.base import AttackInputs, RegularizerInputs
from test_train_step import _max_rel_err


N, D, C = 8, (6, 6, 1), 10






def linear(seed=0):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(int(np.prod(D)), C)), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(N,) + D), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, N), jnp.int32)
  forward = lambda params, z: (z.reshape(z.shape[0], -1) @ params, None)  # noqa: E731
  return w, x, y, forward


def reg_inputs(args, forward, params, x, y, delta, logits, aux=None):
  keys = randomness.example_keys(jax.random.key(0), jnp.arange(x.shape[0]))
  return RegularizerInputs(args, forward, params, x, y, delta, logits, keys, jnp.float32(0.1),
                           None, jnp.float32(0.5), None, aux)






def bn_model():
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


def attack_inputs(name, x, y, train_logits, eval_logits, eps, args=None):
  m = methods.get(name)
  keys = randomness.example_keys(jax.random.key(5), jnp.arange(x.shape[0]))
  loss_fn = lambda z: losses.cross_entropy(train_logits(z), y)  # noqa: E731
  return AttackInputs(args=args or m.default_args(), loss_fn=loss_fn, logits_fn=train_logits,
                      x=x, y=y, keys=keys, eps=jnp.float32(eps), carried=None,
                      init=m.default_init, step=jnp.int32(0), progress=jnp.float32(0.5),
                      axis_name=None, eval_logits_fn=eval_logits, label_smoothing=0.4)
