"""Models: shapes, parameter counts, initialisation, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from fastadv_jax import models
from fastadv_jax.training import model_config


def _params(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_preact_resnet18_parameter_count():
  variables = _params(models.PreActResNet18(num_classes=10), (1, 32, 32, 3))
  # Counted by hand: stem conv, 8 blocks (2 BN + 2 convs, 1x1 shortcut when the shape changes),
  # final BN, linear head.
  expected = 3 * 3 * 3 * 64
  c_in = 64
  for width in (64, 128, 256, 512):
    for block in range(2):
      expected += 2 * c_in + 9 * c_in * width + 2 * width + 9 * width * width
      if c_in != width:
        expected += c_in * width
      c_in = width
  expected += 2 * 512 + 512 * 10 + 10
  assert _count(variables["params"]) == expected
  assert abs(expected - 11.17e6) < 0.01e6  # "~11.17M" of the original


def test_resnet18_parameter_count_matches_the_benchmark_model():
  """The CIFAR ResNet-18 the 2024-26 fast-AT benchmark trains (kuangliu's layout): 11,173,962
  parameters, and BatchNorm after every convolution (20: stem, 16 in blocks, 3 shortcuts)."""
  c = load_config()
  c.model = "resnet18"
  variables = _params(model_config.create_model(c, 10), (1, 32, 32, 3))
  assert _count(variables["params"]) == 11_173_962
  assert len(jax.tree.leaves(variables["batch_stats"])) == 2 * 20


@pytest.mark.parametrize("depth,params", [(28, 36_479_194), (34, 46_160_474)])
def test_wide_resnet_parameter_counts_match_robustbench(depth, params):
  """RobustBench's WRN-28-10 and WRN-34-10 (the published 36.5M and 46.2M)."""
  c = load_config()
  c.model, c.model_args.wide_resnet.depth = "wide_resnet", depth
  assert _count(_params(model_config.create_model(c, 10), (1, 32, 32, 3))["params"]) == params


@pytest.mark.parametrize("depth", [28, 34, 70])
@pytest.mark.parametrize("widen", [10, 16])
def test_wide_resnet_parameter_counts_by_hand(depth, widen):
  """Counted by hand (jax.eval_shape: WRN-70-16 allocates nothing): stem conv of 16, per block
  BN (2 x in), conv3x3, BN, conv3x3 and a 1x1 shortcut where the width changes; BN, linear."""
  c = load_config()
  c.model = "wide_resnet"
  c.model_args.wide_resnet.depth, c.model_args.wide_resnet.widen = depth, widen
  expected, c_in = 9 * 3 * 16, 16
  for width in (16 * widen, 32 * widen, 64 * widen):
    for _ in range((depth - 4) // 6):
      expected += 2 * c_in + 9 * c_in * width + 2 * width + 9 * width * width
      expected += c_in * width if c_in != width else 0
      c_in = width
  expected += 2 * c_in + c_in * 10 + 10
  assert _count(_params(model_config.create_model(c, 10), (1, 32, 32, 3))["params"]) == expected
  if (depth, widen) == (70, 16):
    assert abs(expected - 266.8e6) < 0.05e6  # Gowal et al. (2020)'s "266.8M" WRN-70-16


@pytest.mark.parametrize("name", ["small_cnn", "wide_resnet"])
def test_input_normalization_keeps_the_parameters_and_normalises_the_input(name):
  """With input_mean / input_std the model is wrapped, its parameters keep their names and
  initial values, and it computes the bare model on (x - mean) / std (also in training, with
  its BatchNorm updates); without, it is the bare model itself."""
  c = load_config()
  c.model, c.dataset, c.model_args.small_cnn.n_filters = name, "cifar10", 4
  c.model_args.wide_resnet.depth, c.model_args.wide_resnet.widen = 10, 1
  bare = model_config.create_model(c, 10)
  assert not isinstance(bare, models.InputNormalization)
  c.input_mean, c.input_std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
  wrapped = model_config.create_model(c, 10)
  assert isinstance(wrapped, models.InputNormalization) and wrapped.dtype == jnp.float32
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  v = bare.init(jax.random.key(0), x, train=False)
  jax.tree.map(np.testing.assert_array_equal, wrapped.init(jax.random.key(0), x, train=False), v)
  normalised = (x - jnp.array(c.input_mean)) / jnp.array(c.input_std)
  got = wrapped.apply(v, x, train=True, mutable=["batch_stats"])
  want = bare.apply(v, normalised, train=True, mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not np.allclose(got[0], bare.apply(v, x, train=True, mutable=["batch_stats"])[0])


@pytest.mark.parametrize("name,shape", [("preact_resnet18", (2, 32, 32, 3)),
                                        ("wide_resnet", (2, 32, 32, 3)),
                                        ("cnn", (2, 32, 32, 3)), ("small_cnn", (2, 28, 28, 1))])
def test_output_shapes_and_dtypes(name, shape):
  c = load_config()
  c.model = name
  c.model_args.cnn.n_filters = c.model_args.small_cnn.n_filters = 4
  c.model_args.preact_resnet18.stage_widths = (8, 8, 8, 8)  # shrunk: same topology, fast on CPU
  c.model_args.wide_resnet.depth, c.model_args.wide_resnet.widen = 10, 1
  for half in (False, True):
    model = model_config.create_model(c, 10, half_precision=half)
    variables = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
    logits = model.apply(variables, jax.random.uniform(jax.random.key(1), shape), train=False)
    assert logits.shape == (shape[0], 10) and logits.dtype == jnp.float32


def test_paper_cnn_parameter_count():
  c = load_config()
  c.model, c.model_args.cnn.n_filters, c.model_args.cnn.n_layers = "cnn", 4, 1
  variables = _params(model_config.create_model(c, 10), (1, 32, 32, 3))
  assert _count(variables["params"]) == (27 * 4 + 4) + (32 * 32 * 4 * 10 + 10)


def test_resnet_init_matches_the_original():
  variables = models.PreActResNet18().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  k = variables["params"]["layer4_1"]["conv2"]["kernel"]  # 3x3x512x512
  assert np.std(np.asarray(k)) == pytest.approx(np.sqrt(2.0 / (9 * 512)), rel=0.02)
  lin = variables["params"]["linear"]
  assert np.std(np.asarray(lin["kernel"])) == pytest.approx(np.sqrt(2.0 / 512), rel=0.1)
  assert not np.any(np.asarray(lin["bias"]))
  assert np.all(np.asarray(variables["params"]["bn"]["scale"]) == 1.0)


def test_unknown_model():
  c = load_config()
  c.model = "vgg"
  with pytest.raises(ValueError, match="config.model"):
    model_config.create_model(c, 10)


def test_max_pool_matches_flax():
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  np.testing.assert_allclose(models.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
