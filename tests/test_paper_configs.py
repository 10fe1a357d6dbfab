"""Every experiment config: its docstring command parses, validates, and trains a step on mock data."""
import re

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import ROOT, load_config
from fastadv_jax import methods, parallel
from fastadv_jax.data import datasets
from fastadv_jax.training import config_validation, model_config, train_step
from fastadv_jax.training import train_state as ts

CONFIGS = ["cifar10", "svhn", "cifar10_cnn", "fashion_mnist", "fastat_benchmark",
           "fmnist_protocol"]
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
  assert (cnn.model, cnn.model_args.cnn.n_filters, cnn.model_args.cnn.n_layers, cnn.optimizer,
          cnn.lr_max) == ("cnn", 4, 1, "adam", 0.003)
  assert load_config("cifar10_cnn", "fgsm,eps=10,n_filters=1").model_args.cnn.n_filters == 1
  with pytest.raises(ValueError, match="unknown method"):
    load_config("cifar10", "no_such_method,eps=8")
  with pytest.raises(ValueError, match="unknown field"):
    load_config("cifar10", "fgsm,epochs=3")


def test_benchmark_protocol_settings():
  """configs/fastat_benchmark.py sets the 2024-26 benchmark's protocol for any method."""
  c = load_config("fastat_benchmark", "liet")
  assert (c.dataset, c.model, c.batch_size, c.num_epochs, c.eps) == (
      "cifar10", "resnet18", 128, 100, pytest.approx(8 / 255))
  assert (c.lr_schedule, c.schedule_unit, c.lr_max, c.weight_decay) == ("onecycle", "epoch",
                                                                         0.1, 5e-4)
  assert (c.label_smoothing, c.label_smoothing_attack) == (0.4, True)
  assert (c.ema_decay, c.ema_warmup, c.ema_batch_stats) == (0.9995, False, True)
  assert (c.validation_size, c.selection) == (1000, "validation")
  assert c.eval_every == 49_000 // 128  # selection once per epoch
  assert (c.eval_pgd_steps, c.eval_step_alpha * c.eps) == (10, pytest.approx(2 / 255))
  assert (c.n_final_eval, c.final_attack) == (-1, "pgd,autoattack")
  for preset in ("pgd_at", "n_aaer"):  # their attacks ascend the plain cross-entropy
    assert not load_config("fastat_benchmark", preset).label_smoothing_attack
  assert load_config("fastat_benchmark", "n_aaer").label_smoothing == 0.0
  off = load_config("fastat_benchmark", "pgd_at,ema_decay=0")
  assert off.ema_decay == 0.0 and off.method == "pgd_at"
  protocol = load_config("fmnist_protocol", "fgsm_pgi")
  assert (protocol.validation_size, protocol.selection, protocol.label_smoothing) == (
      1000, "validation", 0.4)
  assert (protocol.ema_decay, protocol.ema_warmup, protocol.final_attack) == (
      0.995, True, "pgd,autoattack")


def test_benchmark_config_trains_selects_and_evaluates_on_mock_data(tmp_path):
  """The benchmark config end to end on mock CIFAR-10 (the paper CNN in place of ResNet-18,
  for time): one-cycle lr and momentum per epoch, averaged weights, the validation split and
  selection, the final evaluation of last, averaged and selected weights."""
  from fastadv_jax.training import metric_writers, train
  c = load_config("fastat_benchmark", "fgsm_pgi")
  c.model, c.half_precision = "cnn", False
  c.model_args.cnn.n_filters, c.model_args.cnn.n_layers = 4, 1
  c.batch_size, c.num_epochs, c.validation_size = 8, 10, 8
  c.eval_every = c.checkpoint_every = 8  # 24 - 8 = 16 training images: 2 iterations per epoch
  c.log_every, c.n_eval_points, c.n_final_eval, c.eval_batch_size = 1, 8, 8, 8
  c.final_attack, c.progress_bar, c.data_dir = "pgd,apgd-ce", False, "/nonexistent-use-mock"
  c.final_pgd_steps = c.eval_pgd_steps = 2
  with tfds.testing.mock_data(num_examples=24):
    results = train.train_and_evaluate(c, str(tmp_path))
  rows = metric_writers.read_metrics(str(tmp_path))
  train_rows = [r for r in rows if "lr" in r]
  lrs = [r["lr"] for r in train_rows]
  assert lrs[0::2] == lrs[1::2]  # constant within an epoch
  # OneCycleLR over 10 epochs: max_lr / 25 at epoch 0, max_lr at epoch 2 (= 0.3 * 10 - 1), with
  # the momentum at its maximum and minimum there.
  assert (lrs[0], lrs[4]) == (pytest.approx(0.1 / 25, rel=1e-5), pytest.approx(0.1, rel=1e-5))
  assert (train_rows[0]["momentum"], train_rows[4]["momentum"]) == (pytest.approx(0.95),
                                                                    pytest.approx(0.85))
  assert results["selected"]["weights"] in ("raw", "averaged")
  for block in ("averaged", "selected"):
    assert {"clean_acc", "pgd_acc", "autoattack_acc"} <= results[block].keys(), block
  assert not any(k.startswith("test_") for r in rows for k in r)  # the test set only at the end


@pytest.mark.parametrize("name,method", [("cifar10_cnn", m) for m in METHODS]  # every method
                         + [("cifar10", "gradalign"), ("cifar10", "free"), ("cifar10", "pgd2"),
                            ("cifar10", "pgd2,model=wide_resnet,depth=10,widen=1"),
                            ("svhn", "gradalign"), ("fashion_mnist", "gradalign")])
def test_one_step_on_mock_data(name, method):
  preset, *extra = method.split(",")
  c = load_config(name, ",".join([preset, "eps=8"] + extra))
  c.batch_size = 8
  c.model_args.preact_resnet18.stage_widths = (4, 4, 4, 4)  # shrunken (same topology)
  config_validation.validate_config(c, num_devices=1)
  with tfds.testing.mock_data(num_examples=8):
    split = datasets.load_split(c.dataset, "train", "/nonexistent-use-mock")
  model = model_config.create_model(c, datasets.NUM_CLASSES[c.dataset], bn_axis_name=parallel.AXIS)
  # 100 iterations per epoch: the cyclic schedule's first learning rate is then non-zero.
  # (n_examples and the batch's positions: for methods with per-example state, FGSM-PGI/-PCO)
  n = len(split.labels)
  state = ts.create_train_state(c, model, jax.random.key(0), split.images.shape[1:], 100,
                                n_examples=n)
  step = parallel.pmap_train_step(train_step.make_train_step(c, model, 100),
                                    devices=jax.local_devices()[:1])
  before = jax.tree.map(np.asarray, state.params)
  rstate, metrics = step(parallel.replicate(state, 1), {"image": split.images[None],
                                                  "label": split.labels[None],
                                                  "index": np.arange(n, dtype=np.int32)[None]},
                         jax.random.key(1))
  assert bool(metrics["finite"][0])
  after = parallel.unreplicate(rstate).params
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before),
                                                   jax.tree.leaves(after)))
  if c.grad_align_lambda > 0:
    assert float(metrics["train_reg"][0]) > 0
