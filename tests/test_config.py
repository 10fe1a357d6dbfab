"""Config validation fails up front with one line naming the field."""
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from fastadv_jax.training import config_validation, schedules, workdir
from fastadv_jax.training.config_validation import ConfigError, validate_config


def test_default_config_is_valid():
  validate_config(load_config(), num_devices=8)


@pytest.mark.parametrize("field,value,pattern", [
    ("dataset", "imagenet", "config.dataset: unknown dataset"),
    ("model", "vgg", "config.model: unknown model"),
    ("method", "mart", "config.method: unknown method"),
    ("eps", -0.1, "config.eps: must be in"),
    ("eps", 8.0, "config.eps: must be in"),
    ("num_epochs", 0, "config.num_epochs: must be >= 1"),
    ("optimizer", "lamb", "config.optimizer"),
    ("lr_schedule", "cosine", "config.lr_schedule"),
    ("n_final_eval", 0, "config.n_final_eval"),
])
def test_bad_values_name_the_field(field, value, pattern):
  c = load_config()
  c[field] = value
  with pytest.raises(ConfigError, match=pattern):
    validate_config(c)


@pytest.mark.parametrize("method,field,value,pattern", [
    ("pgd", "steps", 0, "config.method_args.pgd.steps: must be >= 1, got 0"),
    ("nfgsm", "step", 0.0, "config.method_args.nfgsm.step: must be > 0"),
    ("free", "replay", 0, "config.method_args.free.replay: must be >= 1"),
    ("zerograd", "quantile", 1.0, r"config.method_args.zerograd.quantile: must be in \[0, 1\)"),
    ("nuat", "ramp", 0.0, r"config.method_args.nuat.ramp: must be in \(0, 1\]"),
])
def test_bad_method_args_name_the_method_and_field(method, field, value, pattern):
  c = load_config()
  c.method = method
  c.method_args[method][field] = value
  with pytest.raises(ConfigError, match=pattern):
    validate_config(c)
  c.method = "fgsm"  # set for a method the run does not train: refused all the same
  with pytest.raises(ConfigError, match=f"config.method_args.{method}.{field}: "):
    validate_config(c)


def test_another_methods_hyperparameters_set_are_a_warning_naming_both(caplog):
  """A forgotten --config.method=nfgsm would train FGSM and ignore the noise asked for: one
  warning (not a refusal: a sweep over methods passes one method's values to every run)."""
  import logging  # pylint: disable=import-outside-toplevel
  c = load_config()
  c.method_args.nfgsm.noise = 3.0
  with caplog.at_level(logging.WARNING):
    validate_config(c)
  warned = [r.getMessage() for r in caplog.records if "method_args" in r.getMessage()]
  assert warned == ["config.method_args.nfgsm.noise is set to 3.0, but config.method is "
                    "'fgsm', which does not read it (add --config.method=nfgsm if nfgsm was "
                    "meant)"]
  caplog.clear()
  c.method = "nfgsm"
  with caplog.at_level(logging.WARNING):
    validate_config(c)
  c.method_args.nfgsm.noise = 2.0  # the default again: nothing is said
  c.method = "fgsm"
  with caplog.at_level(logging.WARNING):
    validate_config(c)
  assert not [r for r in caplog.records if "method_args" in r.getMessage()]


@pytest.mark.parametrize("field,value,pattern", [
    ("momentum", 1.5, r"config.momentum: must be in \[0, 1\)"),
    ("momentum", -0.1, r"config.momentum: must be in \[0, 1\)"),
    ("eps_warmup_epochs", 5.0, "config.eps_warmup_epochs: a 5.0-epoch ramp is longer than the "
     "3-epoch run: eps would never reach 0.1"),
    ("co_pgd_drop", float("nan"), "config.co_pgd_drop: must be a finite number, got nan"),
    ("co_fgsm_pgd_gap", 2.0, r"config.co_fgsm_pgd_gap: must be in \[0, 1\]"),
    ("grad_align_lambda", float("inf"), "config.grad_align_lambda: must be a finite number"),
])
def test_settings_that_cannot_work_are_refused(field, value, pattern):
  c = load_config()
  assert c.num_epochs == 3 and c.eps == 0.1  # the defaults the messages above name
  c[field] = value
  with pytest.raises(ConfigError, match=pattern):
    validate_config(c)


def test_a_warm_up_as_long_as_the_run_is_accepted():
  c = load_config()
  c.eps_warmup_epochs = float(c.num_epochs)
  validate_config(c)


def test_method_args_hold_every_method_with_its_published_defaults():
  from fastadv_jax import methods  # pylint: disable=import-outside-toplevel
  c = load_config()
  for name in methods.names():
    m = methods.get(name)
    assert m.args_from(c) == m.default_args(), name
    if m.arg_names:
      assert set(c.method_args[name]) == set(m.arg_names), name
  assert (c.method_args.fgsm.alpha, c.method_args.zerograd.alpha) == (1.25, 2.0)
  assert (c.method_args.nfgsm.noise, c.method_args.pgd.steps, c.method_args.free.replay) == (
      2.0, 10, 8)


def test_cli_sets_method_args_and_names_moved_fields(tmp_path):
  """--config.method_args.<m>.<f> reaches the run; an old top-level name says where it went."""
  proc = subprocess.run(
      [sys.executable, "-m", "fastadv_jax.main", f"--config={ROOT}/configs/default.py",
       f"--workdir={tmp_path}", "--config.method=nfgsm", "--config.method_args.nfgsm.step=0"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.method_args.nfgsm.step: must be > 0, got 0.0")
  proc = subprocess.run(
      [sys.executable, "-m", "fastadv_jax.main", f"--config={ROOT}/configs/default.py",
       f"--workdir={tmp_path}", "--config.pgd_steps=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 2
  assert "config.method_args.<method>.steps now" in proc.stderr.strip().splitlines()[-1]


def test_old_config_json_is_migrated():
  old = {"method": "gat", "eps": 0.1, "fgsm_alpha": 1.0, "gat_lambda": 3.0, "guided_init": 0.5,
         "pgd_steps": 10, "nfgsm_noise": 2.0}
  assert config_validation.migrate_stored_config(old) == {
      "method": "gat", "eps": 0.1, "method_args": {"gat": {"alpha": 1.0, "lam": 3.0,
                                                             "init": 0.5}}, "model_args": {}}
  # The model's sizes move to model_args.<model>; another model's are dropped.
  old = {"method": "fgsm", "method_args": {}, "model": "wide_resnet", "wrn_depth": 34,
         "wrn_widen": 10, "n_filters": 16, "resnet_widths": [64, 128, 256, 512]}
  assert config_validation.migrate_stored_config(old) == {
      "method": "fgsm", "method_args": {}, "model": "wide_resnet",
      "model_args": {"wide_resnet": {"depth": 34, "widen": 10}}}
  new = {"method": "gat", "method_args": {"gat": {"lam": 2.0}}, "model": "cnn",
         "model_args": {"cnn": {"n_filters": 4}}}
  assert config_validation.migrate_stored_config(new) is new
  # An old workdir's config reads back with the run's own sizes.
  c = workdir.config_from_stored({"model": "cnn", "n_filters": 4, "n_layers": 2,
                                  "method": "fgsm"})
  assert (c.model_args.cnn.n_filters, c.model_args.cnn.n_layers) == (4, 2)
  assert "n_filters" not in c and c.model_args.small_cnn.n_filters == 16  # others: defaults


def test_an_old_model_field_says_where_it_went():
  assert config_validation.moved_field_hint("n_filters") == (
      "; model hyperparameters are config.model_args.<model>.<field> now: "
      "model_args.cnn.n_filters, model_args.small_cnn.n_filters")
  assert "model_args.wide_resnet.depth" in config_validation.moved_field_hint("wrn_depth")
  assert config_validation.moved_field_hint("not_a_field") == ""


def test_model_args_are_checked_by_the_models_record():
  for field, value, message in (("n_filters", 0, "must be >= 1, got 0"),
                                ("n_layers", 0, "must be >= 1, got 0")):
    c = load_config()
    c.model = "cnn"
    c.model_args.cnn[field] = value
    with pytest.raises(ConfigError, match=rf"config.model_args.cnn.{field}: {message}"):
      validate_config(c, num_devices=1)
  c = load_config()
  c.model, c.model_args.wide_resnet.depth = "wide_resnet", 27
  with pytest.raises(ConfigError, match=r"model_args.wide_resnet.depth: must be 6n \+ 4"):
    validate_config(c, num_devices=1)
  c.model = "cnn"  # another model's args are not read, so not checked
  validate_config(c, num_devices=1)


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
