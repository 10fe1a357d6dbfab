"""Config validation fails up front with one line naming the field."""
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from fastadv_jax import schedules
from fastadv_jax.config_validation import ConfigError, validate_config


def test_default_config_is_valid():
  validate_config(load_config(), num_devices=8)


@pytest.mark.parametrize("field,value,pattern", [
    ("dataset", "imagenet", "config.dataset: unknown dataset"),
    ("model", "vgg", "config.model: unknown model"),
    ("method", "trades", "config.method: unknown method"),
    ("eps", -0.1, "config.eps: must be in"),
    ("eps", 8.0, "config.eps: must be in"),
    ("num_epochs", 0, "config.num_epochs: must be >= 1"),
    ("optimizer", "lamb", "config.optimizer"),
    ("lr_schedule", "cosine", "config.lr_schedule"),
    ("pgd_steps", 0, "config.pgd_steps"),
    ("n_final_eval", 0, "config.n_final_eval"),
])
def test_bad_values_name_the_field(field, value, pattern):
  c = load_config()
  c[field] = value
  with pytest.raises(ConfigError, match=pattern):
    validate_config(c)


def test_batch_must_divide_over_devices():
  c = load_config()
  c.batch_size = 100
  validate_config(c, num_devices=4)
  with pytest.raises(ConfigError, match="not divisible by the 8 devices"):
    validate_config(c, num_devices=8)


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "fastadv_jax.main", f"--config={ROOT}/configs/default.py",
       f"--workdir={tmp_path}", "--config.eps=2.0"], capture_output=True, text=True, cwd=ROOT,
      timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: config.eps: must be in [0, 1]")


def test_lr_schedules_match_the_original():
  c = load_config()
  c.num_epochs, c.lr_max = 10, 0.2
  c.lr_schedule = "cyclic"
  lr = schedules.lr_schedule(c, steps_per_epoch=100)
  assert float(lr(399)) == pytest.approx(0.2)           # peak at 2/5 of training
  assert float(lr(199)) == pytest.approx(0.1)           # linear ramp from 0
  assert float(lr(699)) == pytest.approx(0.1)           # linear decay to 0
  assert float(lr(999)) == pytest.approx(0.0, abs=1e-7)
  c.lr_schedule = "piecewise"
  lr = schedules.lr_schedule(c, steps_per_epoch=100)
  assert [float(lr(s)) for s in (0, 498, 500, 748, 750)] == pytest.approx(
      [0.2, 0.2, 0.02, 0.02, 0.002])


def test_eps_warmup_and_lambda_schedules():
  c = load_config()
  c.eps, c.eps_warmup_epochs = 0.1, 5
  eps = schedules.eps_schedule(c, steps_per_epoch=10)
  assert float(eps(24)) == pytest.approx(0.05) and float(eps(100)) == pytest.approx(0.1)
  assert schedules.grad_align_lambda(8 / 255, "cifar10") == pytest.approx(0.2)
  assert schedules.grad_align_lambda(16 / 255, "cifar10") == pytest.approx(2.0)
  assert schedules.grad_align_lambda(8 / 255, "svhn_cropped") == pytest.approx(2.5)
  assert schedules.grad_align_lambda(12 / 255, "svhn_cropped") == pytest.approx(3.162, rel=1e-3)
