"""Shared cases of tests/methods/ (test_pgi.py, test_pco.py): small models and inputs."""
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import losses, randomness
from fastadv_jax.methods.base import AttackInputs, RegularizerInputs


N, D, C, EPS = 12, (4, 4, 3), 5, 0.1


def np_logits(w, b, z):
  return z.reshape(z.shape[0], -1) @ w.T + b


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_input_grad(w, b, z, targets):
  """grad_z sum_i CE(softmax(W z_i + b), t_i) = (p - t) W, per example."""
  return ((np_softmax(np_logits(w, b, z)) - targets) @ w).reshape(z.shape)






def np_proj(delta, x):
  return np.clip(np.clip(delta, -EPS, EPS), -x, 1 - x)


def problem(seed):
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


def jax_linear(w, b):
  return lambda z: z.reshape(z.shape[0], -1) @ jnp.asarray(w).T + jnp.asarray(b)


def inputs(args, w, b, x, y, rows, k, smoothing=0.0, attack_smoothing=0.0, epoch=0):
  logits_fn = jax_linear(w, b)
  keys = randomness.example_keys(jax.random.key(100 + k), jnp.arange(x.shape[0]))
  return AttackInputs(
      args=args, loss_fn=lambda z: losses.cross_entropy(logits_fn(z), jnp.asarray(y),
                                                        attack_smoothing),
      logits_fn=logits_fn, x=jnp.asarray(x), y=jnp.asarray(y), keys=keys, eps=jnp.asarray(EPS),
      carried=None, init="zero", step=jnp.asarray(k), progress=jnp.asarray(0.5),
      axis_name=None, example_rows=rows, epoch=epoch, label_smoothing=smoothing)


def rows_of(table, idx):
  return None if table is None else jax.tree.map(lambda t: jnp.asarray(t[idx]), table)


def store(table, idx, rows):
  rows = jax.tree.map(np.asarray, rows)
  if table is None:
    table = {k: np.zeros((N,) + v.shape[1:], v.dtype) for k, v in rows.items()}
  for k, v in rows.items():
    table[k][idx] = v
  return table


def first_draw(inp):
  """The uniform noise the buffers start from (per-example keys of step 0)."""
  return np.asarray(randomness.uniform_like(inp.keys, inp.x, -1.0, 1.0))


def linear_forward(params, z):
  return z.reshape(z.shape[0], -1) @ params["w"].T + params["b"], None


def fd_grad(f, w, b, h=1e-6):
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


def reg_inputs(args, params, x, y, delta, aux):
  keys = randomness.example_keys(jax.random.key(7), jnp.arange(x.shape[0]))
  return RegularizerInputs(args, linear_forward, params, jnp.asarray(x), jnp.asarray(y),
                           jnp.asarray(delta), None, keys, jnp.asarray(EPS), None,
                           jnp.asarray(0.5), None, aux=None if aux is None else jnp.asarray(aux))


