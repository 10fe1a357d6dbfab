"""Models as records in an open registry: a model defined outside the package (the plugin
tests/plugins/my_model.py) trains, evaluates and exports to PyTorch through the command lines,
and the registry refuses ambiguity and names its models."""
import dataclasses
import importlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (MOCK_DATA_CLI, ROOT, TINY_CLI, USERS_XLA_FLAGS, needs_torch, tiny_config,
                      torch_logits)
from fastadv_jax import models
from fastadv_jax.interop import torch_interop
from fastadv_jax.runtime import xla_cpu
from fastadv_jax.training import config_validation, model_config, saved_run, train_step

PLUGINS = ROOT / "tests" / "plugins"
NO_YNN_CONV = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def _import_plugin():
  """The plugin as `my_model`, the module name config.plugins records (one module, one record)."""
  if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))
  return importlib.import_module("my_model")


def test_builtin_records_keep_their_flags_derivatives_and_layouts():
  assert set(models.names()) >= {"preact_resnet18", "wide_resnet", "cnn", "small_cnn"}
  for name in ("preact_resnet18", "wide_resnet"):
    assert models.xla_flags(name) == xla_cpu.RESNET_FLAGS
    assert train_step.derivative_mode(tiny_config(model=name)) == "jvp"
  for name in ("cnn", "small_cnn"):
    assert models.xla_flags(name) == xla_cpu.CNN_FLAGS
    assert train_step.derivative_mode(tiny_config(model=name)) == "double_backprop"
  assert models.xla_flags("not_registered") == xla_cpu.CNN_FLAGS
  # the built-ins first, in their order (a plugin registered by an earlier test comes after)
  assert torch_interop.exportable()[:4] == ("preact_resnet18", "wide_resnet", "cnn", "small_cnn")


def test_a_taken_name_refuses_a_different_record():
  cnn = models.get("cnn")
  assert models.register(cnn) is cnn  # the same record again: a no-op
  with pytest.raises(ValueError, match="'cnn' is already registered"):
    models.register(dataclasses.replace(cnn, gradalign_derivative="jvp"))
  with pytest.raises(ValueError, match="'cnn' is already registered"):
    models.register(models.ModelSpec("cnn", lambda *a: None))
  assert models.get("cnn") is cnn
  with pytest.raises(ValueError, match="gradalign_derivative"):
    models.ModelSpec("x", lambda *a: None, gradalign_derivative="forward")


def test_an_unknown_model_is_one_line_naming_the_registered_ones():
  _import_plugin()
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate_config(tiny_config(model="vgg"))
  message = str(e.value)
  assert message.startswith("config.model: unknown model 'vgg'") and "\n" not in message
  for name in models.names():
    assert repr(name) in message
  assert "'my_model'" in message  # the live registry, plugins included
  with pytest.raises(ValueError, match="unknown model 'vgg'; choose from"):
    models.get("vgg")


def test_the_plugin_record_is_what_the_library_reads():
  plugin = _import_plugin()
  config = tiny_config(model="my_model", plugins="my_model")
  config_validation.validate_config(config)  # imports config.plugins, then finds the model
  assert models.get("my_model") is plugin.RECORD
  assert isinstance(model_config.create_model(config, 10), plugin.MyMLP)
  assert models.xla_flags("my_model") == xla_cpu.RESNET_FLAGS
  assert train_step.derivative_mode(config) == "jvp"
  assert torch_interop.torch_layout(config) is plugin.TORCH  # its own PyTorch layout
  assert "my_model" in torch_interop.exportable()
  # A record without one is refused in one line naming the models that have one.
  models.register(dataclasses.replace(plugin.RECORD, name="my_model_no_torch", torch=None))
  try:
    with pytest.raises(torch_interop.InteropError,
                       match="supports .*'my_model'.*not 'my_model_no_torch'"):
      torch_interop.check_supported(tiny_config(model="my_model_no_torch"))
  finally:
    models.unregister("my_model_no_torch")


def test_a_plugin_model_trains_evaluates_and_exports_through_the_command_lines(tmp_path):
  wd = tmp_path / "wd"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user's shell has it
  env.update({"JAX_NUM_CPU_DEVICES": "1", USERS_XLA_FLAGS: "1",  # the model's flags applied
              "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), env.get("PYTHONPATH")]))})
  argv = [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
          f"--config={ROOT}/configs/default.py", f"--workdir={wd}"] + TINY_CLI + [
              "--config.plugins=my_model", "--config.model=my_model",
              "--config.model_args.my_model.hidden=6"]
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((wd / "config.json").read_text())["plugins"] == "my_model"
  results = json.loads((wd / "results.json").read_text())
  assert results["xla_flags"] == NO_YNN_CONV  # the record's flags, applied before JAX started
  assert "will not take effect" not in proc.stderr

  proc = subprocess.run([sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.evaluate",
                         f"--workdir={wd}", "--n_eval=16", "--pgd_steps=2", "--pgd_restarts=1"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads(next(wd.glob("eval_last_*.json")).read_text())
  assert evaluated["xla_flags"] == NO_YNN_CONV and 0.0 <= evaluated["clean_acc"] <= 1.0

  _import_plugin()  # in this process too, under the name config.json records
  _, variables, _ = saved_run.load_run(str(wd))
  shapes = {layer: {k: tuple(a.shape) for k, a in p.items()}
            for layer, p in variables["params"].items()}
  assert shapes == {"my_hidden": {"kernel": (28 * 28, 6), "bias": (6,)},
                    "my_logits": {"kernel": (6, 10), "bias": (10,)}}

  # torch_export writes the plugin's layout and ships its own PyTorch file as model.py.
  out = tmp_path / "export"
  proc = subprocess.run([sys.executable, "-m", "fastadv_jax.torch_export", f"--workdir={wd}",
                         f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  spec = json.loads((out / "spec.json").read_text())
  assert spec["architecture"] == "my_model"
  assert spec["kwargs"] == {"in_features": 28 * 28, "hidden": 6, "num_classes": 10}
  assert (out / "model.py").read_text() == (PLUGINS / "my_model_torch.py").read_text()
  with np.load(out / "state_dict.npz") as sd:
    assert sorted(sd.files) == ["hidden.bias", "hidden.weight", "logits.bias", "logits.weight"]
    # one channel: PyTorch's NCHW flattening is the NHWC one, so the kernel is transposed only
    np.testing.assert_array_equal(sd["hidden.weight"], variables["params"]["my_hidden"]["kernel"].T)
    np.testing.assert_array_equal(sd["logits.weight"], variables["params"]["my_logits"]["kernel"].T)
    np.testing.assert_array_equal(sd["logits.bias"], variables["params"]["my_logits"]["bias"])


@needs_torch
def test_pytorch_runs_a_plugin_models_export_with_the_same_logits(tmp_path):
  """Three-channel images, so the export's first layer must reorder its rows from NHWC to
  NCHW flattening (dense_flat); PyTorch's logits equal Flax's."""
  plugin = _import_plugin()
  shape = (4, 4, 3)
  model = plugin.MyMLP(num_classes=5, hidden=7)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + shape))
  config = tiny_config(model="my_model", plugins="my_model", model_args={"my_model": {"hidden": 7}})
  torch_interop.write_export(str(tmp_path), config, variables, 5, shape)
  x = np.random.default_rng(0).uniform(size=(6,) + shape).astype(np.float32)
  np.testing.assert_allclose(torch_logits(tmp_path, x), model.apply(variables, x), atol=1e-5)
