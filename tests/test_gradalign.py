"""GradAlign: finite differences in float64, the zero-gradient mask, g1 reuse."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import attacks, gradalign, losses, models
from fastadv_jax.training import train_step


def _per_example_loss(model, params, batch_stats, y):
  def loss(z):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, z, train=True,
                            mutable=["batch_stats"])
    return losses.cross_entropy(logits, y)
  return loss


def _reg_fn(model, batch_stats, x, y, keys, eps, lam, backprop_g1, fixed_g1=None):
  """GradAlign term as a function of the parameters (BatchNorm in train mode, as in training).

  With `fixed_g1`, g1 is that constant (what a stopped g1 means for the parameter gradient).
  """
  def reg(params):
    g1, g2 = gradalign.input_gradients(_per_example_loss(model, params, batch_stats, y), x, keys,
                                       eps, g1=fixed_g1, backprop_g1=backprop_g1)
    cos, mask = gradalign.masked_cosine(g1, g2)
    return gradalign.gradalign_regularizer(cos, mask, lam)[1]
  return reg


def _float64_problem():
  """A small BatchNorm CNN in float64 with a batch, its variables and noise keys."""
  model = models.SmallCNN(num_classes=3, width=2, use_batch_norm=True, dtype=jnp.float64)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), jnp.float64)
  y = jnp.array([0, 1, 2, 1])
  variables = model.init(jax.random.key(1), x, train=False)
  params = jax.tree.map(lambda p: p.astype(jnp.float64), variables["params"])
  return model, x, y, variables, params, jax.random.split(jax.random.key(2), 4)


@pytest.mark.parametrize("backprop_g1", [False, True])
def test_gradalign_gradient_matches_finite_differences(x64, backprop_g1):
  # Smooth activations would hide nothing here: ReLU kinks are measure-zero for random inputs,
  # and the step h is far below the distance to any kink for this seed.
  model, x, y, variables, params, keys = _float64_problem()
  reg = _reg_fn(model, variables["batch_stats"], x, y, keys, 0.1, 0.7, backprop_g1)
  value, grad = jax.value_and_grad(reg)(params)
  assert 0.0 < float(value) < 1.4  # lam * (1 - cos), cos in (-1, 1)
  if not backprop_g1:
    # A stopped g1 is a constant: finite differences must hold it at its current value.
    g1 = attacks.input_grad(_per_example_loss(model, params, variables["batch_stats"], y), x)
    reg = _reg_fn(model, variables["batch_stats"], x, y, keys, 0.1, 0.7, False, fixed_g1=g1)
    assert float(reg(params)) == pytest.approx(float(value), rel=1e-12)

  def tree_dot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  leaves, treedef = jax.tree.flatten(params)
  dirs = jax.random.split(jax.random.key(3), 3)
  for d in dirs:
    v = jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape, jnp.float64) for k, p in
                                     zip(jax.random.split(d, len(leaves)), leaves)])
    h = 1e-6
    plus = reg(jax.tree.map(lambda p, u: p + h * u, params, v))
    minus = reg(jax.tree.map(lambda p, u: p - h * u, params, v))
    fd = (plus - minus) / (2 * h)
    np.testing.assert_allclose(float(tree_dot(grad, v)), float(fd), rtol=1e-6, atol=1e-9)


def test_stopping_g1_changes_the_gradient(x64):
  """The switch matters: differentiating through g1 adds a term (else the option is a no-op)."""
  model = models.SmallCNN(num_classes=3, width=2, use_batch_norm=True, dtype=jnp.float64)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1), jnp.float64)
  y = jnp.array([0, 1, 2, 1])
  variables = model.init(jax.random.key(1), x, train=False)
  keys = jax.random.split(jax.random.key(2), 4)
  args = (model, variables["batch_stats"], x, y, keys, 0.1, 0.7)
  g_stop = jax.grad(_reg_fn(*args, False))(variables["params"])
  g_full = jax.grad(_reg_fn(*args, True))(variables["params"])
  assert float(_reg_fn(*args, False)(variables["params"])) == pytest.approx(
      float(_reg_fn(*args, True)(variables["params"])))
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(g_stop), jax.tree.leaves(g_full)))
  assert diff > 1e-6


class _Thresholded(nn.Module):
  """logits = W relu(x - 0.5): an input with every pixel below 0.5 - eps has zero gradient."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(nn.relu(x.reshape(x.shape[0], -1) - 0.5))


def test_zero_gradient_example_is_masked_without_nan():
  model = _Thresholded()
  x = jax.random.uniform(jax.random.key(0), (5, 4, 4, 1), minval=0.6, maxval=1.0)
  x = x.at[2].set(0.1)  # example 2: dead input, exactly zero input gradient everywhere
  y = jnp.array([0, 1, 2, 0, 1])
  params = model.init(jax.random.key(1), x)["params"]
  keys = jax.random.split(jax.random.key(2), 5)
  eps, lam = 0.05, 0.5

  def reg(params, idx):
    loss_fn = lambda z: losses.cross_entropy(model.apply({"params": params}, z), y[idx])  # noqa
    g1, g2 = gradalign.input_gradients(loss_fn, x[idx], keys[idx], eps)
    cos, mask = gradalign.masked_cosine(g1, g2)
    return gradalign.gradalign_regularizer(cos, mask, lam)[1], mask

  everything = jnp.arange(5)
  (value, mask), grad = jax.value_and_grad(reg, has_aux=True)(params, everything)
  assert mask.tolist() == [True, True, False, True, True]
  assert np.isfinite(float(value))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
  # The masked mean equals the mean over the other examples only.
  others = jnp.array([0, 1, 3, 4])
  (value_others, _), grad_others = jax.value_and_grad(reg, has_aux=True)(params, others)
  assert float(value) == pytest.approx(float(value_others), rel=1e-6)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_others)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_all_masked_gives_zero_and_finite_gradient():
  g = jnp.zeros((3, 5))
  cos, mask = gradalign.masked_cosine(g, g)
  assert not bool(mask.any())
  loss, reg = gradalign.gradalign_regularizer(cos, mask, 1.0)
  assert float(reg) == 0.0
  grad = jax.grad(lambda a: gradalign.gradalign_regularizer(
      *gradalign.masked_cosine(a, a + 0.0), 1.0)[0])(g)
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_cosine_known_values():
  a = jnp.array([[1.0, 0.0], [1.0, 2.0], [3.0, -1.0]])
  b = jnp.array([[0.0, 5.0], [2.0, 4.0], [-6.0, 2.0]])
  cos, mask = gradalign.masked_cosine(a, b)
  np.testing.assert_allclose(cos, [0.0, 1.0, -1.0], atol=1e-6)
  _, reg = gradalign.gradalign_regularizer(cos, mask, 0.3)
  assert float(reg) == pytest.approx(0.3 * (1 - 0.0))


def test_reused_fgsm_gradient_equals_a_fresh_clean_gradient():
  model = models.SmallCNN(num_classes=3, width=2)
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  y = jnp.array([0, 1, 2, 1])
  v = model.init(jax.random.key(1), x, train=False)
  loss_fn = lambda z: losses.cross_entropy(model.apply(v, z, train=False), y)  # noqa: E731
  _, g_fgsm = attacks.fgsm(loss_fn, x, 0.1, 0.125, jnp.zeros_like(x))
  keys = jax.random.split(jax.random.key(2), 4)
  g1a, g2a = gradalign.input_gradients(loss_fn, x, keys, 0.1, g1=g_fgsm)
  g1b, g2b = gradalign.input_gradients(loss_fn, x, keys, 0.1)
  np.testing.assert_allclose(g1a, g1b, rtol=1e-6)
  np.testing.assert_allclose(g2a, g2b, rtol=1e-6)


def test_the_jvp_derivative_equals_double_backpropagation(x64):
  """Reverse over forward mode (grad_align_derivative=jvp) gives GradAlign's value and
  parameter gradient as double backpropagation does, BatchNorm batch statistics included."""
  model, x, y, variables, params, keys = _float64_problem()
  g1 = attacks.input_grad(_per_example_loss(model, params, variables["batch_stats"], y), x)
  double = _reg_fn(model, variables["batch_stats"], x, y, keys, 0.1, 0.7, False, fixed_g1=g1)

  def by_jvp(p):
    loss = _per_example_loss(model, p, variables["batch_stats"], y)
    return gradalign.regularizer_by_jvp(loss, x, keys, 0.1, g1, 0.7)[0]

  v_d, g_d = jax.value_and_grad(double)(params)
  v_j, g_j = jax.value_and_grad(by_jvp)(params)
  assert float(v_j) == pytest.approx(float(v_d), rel=1e-12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12), g_d, g_j)


def test_auto_picks_the_derivative_per_model():
  from conftest import tiny_config
  from fastadv_jax.training.config_validation import ConfigError, validate_config
  assert train_step.derivative_mode(tiny_config(model="preact_resnet18")) == "jvp"
  assert train_step.derivative_mode(tiny_config(model="small_cnn")) == "double_backprop"
  assert train_step.derivative_mode(tiny_config(model="cnn", grad_align_derivative="jvp")) == "jvp"
  assert train_step.derivative_mode(tiny_config(model="preact_resnet18",
                                               grad_align_backprop_g1=True)) == "double_backprop"
  with pytest.raises(ConfigError, match="grad_align_derivative"):
    validate_config(tiny_config(grad_align_derivative="forward"))
  with pytest.raises(ConfigError, match="jvp does not differentiate through g1"):
    validate_config(tiny_config(grad_align_derivative="jvp", grad_align_backprop_g1=True))


def test_the_nnx_batchnorm_pattern_equals_the_same_network_in_plain_jax():
  """experiments/examples/nnx_batchnorm.py (GradAlign and FGSM on an NNX model with BatchNorm
  in train mode, through split / merge(copy=True)): its GradAlign value equals the same network
  written as plain JAX, and the running statistics move once per step, by the training pass
  at x + delta alone (the attack and GradAlign passes leave them alone)."""
  import sys  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from fastadv_jax import methods  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, "experiments/examples")
  import nnx_batchnorm  # pylint: disable=import-outside-toplevel
  model = nnx_batchnorm.BNCNN(nnx.Rngs(0))
  w = jax.tree.map(jnp.array, {"k": model.conv.kernel.value, "b": model.conv.bias.value,
                               "s": model.bn.scale.value, "c": model.bn.bias.value,
                               "W": model.head.kernel.value, "d": model.head.bias.value})
  x = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1))
  y = jnp.arange(16) % 10
  eps, lam, key = 0.1, 0.2, jax.random.key(3)

  def conv(z):
    return jax.lax.conv_general_dilated(z, w["k"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + w["b"]

  def ce(z):  # BatchNorm in train mode: this batch's statistics, flax's epsilon 1e-5
    h = conv(z)
    mean, var = jnp.mean(h, (0, 1, 2)), jnp.var(h, (0, 1, 2))
    h = jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-5) * w["s"] + w["c"])
    logits = h.reshape(h.shape[0], -1) @ w["W"] + w["d"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  k_attack, k_noise = jax.random.split(key)
  delta = methods.perturb("fgsm", ce, x, y, k_attack, eps).delta
  expected = gradalign.term(ce, x, k_noise, eps, lam).value
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
  _, got = nnx_batchnorm.train_step(model, optimizer, x, y, key, eps, lam)
  np.testing.assert_allclose(float(got), float(expected), rtol=1e-4)
  assert float(expected) > 0
  np.testing.assert_allclose(np.asarray(model.bn.mean.value),
                             0.01 * np.asarray(jnp.mean(conv(x + delta), (0, 1, 2))),
                             rtol=1e-4, atol=1e-7)
