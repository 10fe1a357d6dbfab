"""Every experiment config: its docstring command parses, validates, and trains a step on mock data."""
import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import ROOT, load_config
from fastadv_jax import config_validation, datasets, methods, models, parallel, train_step
from fastadv_jax import train_state as ts

CONFIGS = ["cifar10", "svhn", "cifar10_cnn", "fashion_mnist"]
METHODS = [p for p in methods.presets() if p != "standard"]  # every method, by its paper names


def _docstring_arg(name):
  doc = (ROOT / "configs" / f"{name}.py").read_text()
  m = re.search(rf"--config=configs/{name}\.py:(\S+)", doc)
  assert m, f"configs/{name}.py docstring has no command"
  return m.group(1)


@pytest.mark.parametrize("name", CONFIGS)
def test_docstring_command_parses_and_validates(name):
  c = load_config(name, _docstring_arg(name))
  config_validation.validate_config(c, num_devices=8)


def test_paper_settings():
  ga8 = load_config("cifar10", "gradalign,eps=8")
  assert ga8.eps == pytest.approx(8 / 255) and ga8.grad_align_lambda == pytest.approx(0.2)
  assert ga8.lr_max == 0.3 and ga8.num_epochs == 30 and ga8.method == "fgsm"
  ga16 = load_config("cifar10", "gradalign,eps=16")
  assert ga16.grad_align_lambda == pytest.approx(2.0)
  pgd2 = load_config("cifar10", "pgd2,eps=8,seed=3")
  assert (pgd2.method, pgd2.method_args.pgd.steps, pgd2.method_args.pgd.alpha, pgd2.seed) == (
      "pgd", 2, 0.5, 3)
  assert pgd2.grad_align_lambda == 0.0 and pgd2.lr_max == 0.2
  free = load_config("cifar10", "free,eps=8")
  assert (free.num_epochs, free.lr_max, free.method_args.free.replay) == (96, 0.04, 8)
  svhn = load_config("svhn", "gradalign,eps=12")
  assert svhn.grad_align_lambda == pytest.approx(3.162, rel=1e-3)
  assert (svhn.flip, svhn.crop_padding, svhn.eps_warmup_epochs, svhn.lr_max) == (False, 4, 5.0,
                                                                                 0.05)
  cnn = load_config("cifar10_cnn", "fgsm,eps=10")
  assert (cnn.model, cnn.n_filters, cnn.n_layers, cnn.optimizer, cnn.lr_max) == (
      "cnn", 4, 1, "adam", 0.003)
  with pytest.raises(ValueError, match="unknown method"):
    load_config("cifar10", "trades,eps=8")
  with pytest.raises(ValueError, match="unknown field"):
    load_config("cifar10", "fgsm,epochs=3")


@pytest.mark.parametrize("name,method", [("cifar10_cnn", m) for m in METHODS]  # every method
                         + [("cifar10", "gradalign"), ("cifar10", "free"), ("cifar10", "pgd2"),
                            ("cifar10", "pgd2,model=wide_resnet,wrn_depth=10,wrn_widen=1"),
                            ("svhn", "gradalign"), ("fashion_mnist", "gradalign")])
def test_one_step_on_mock_data(name, method):
  preset, *extra = method.split(",")
  c = load_config(name, ",".join([preset, "eps=8"] + extra))
  c.batch_size = 8
  c.resnet_widths = (4, 4, 4, 4)  # shrunken PreAct ResNet-18 (same topology)
  config_validation.validate_config(c, num_devices=1)
  with tfds.testing.mock_data(num_examples=8):
    split = datasets.load_split(c.dataset, "train", "/nonexistent-use-mock")
  model = models.create_model(c, datasets.NUM_CLASSES[c.dataset], bn_axis_name=parallel.AXIS)
  # 100 iterations per epoch: the cyclic schedule's first learning rate is then non-zero.
  state = ts.create_train_state(c, model, jax.random.key(0), split.images.shape[1:], 100)
  step = parallel.pmap_train_step(train_step.make_train_step(c, model, 100),
                                    devices=jax.local_devices()[:1])
  before = jax.tree.map(np.asarray, state.params)
  rstate, metrics = step(parallel.replicate(state, 1), {"image": split.images[None],
                                                  "label": split.labels[None]},
                         jax.random.key(1))
  assert bool(metrics["finite"][0])
  after = parallel.unreplicate(rstate).params
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before),
                                                   jax.tree.leaves(after)))
  if c.grad_align_lambda > 0:
    assert float(metrics["train_reg"][0]) > 0
