"""Shared cases of tests/methods/ (test_liet.py, test_uap.py): small models and inputs."""
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import losses, methods, randomness
from fastadv_jax.methods.base import AttackInputs


B, D = 8, (5, 5, 1)


EPS, EPS_U = 0.03, 0.05  # eps_u > eps, as 10/255 > 8/255


def linear(n_classes, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(n_classes, int(np.prod(D)))).astype(np.float32)

  def logits_fn(z):
    return z.reshape(z.shape[0], -1) @ jnp.asarray(w).T

  return w, logits_fn


def batch(seed, n_classes, labels=None):
  rng = np.random.default_rng(100 + seed)
  x = rng.uniform(0.2, 0.8, size=(B,) + D).astype(np.float32)  # no [0, 1] clipping within eps
  y = (rng.integers(0, n_classes, B) if labels is None else np.asarray(labels)).astype(np.int32)
  return x, y


def inputs(name, x, y, logits_fn, state, step, **kw):
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


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


