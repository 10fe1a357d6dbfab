"""The runnable examples of experiments/examples/ keep working: each runs in a subprocess on tiny
settings (random data or TFDS mock data) and its printed or written results are checked, so that
a change in the library API that breaks an example fails here, not in a researcher's copy."""
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI
from fastadv_jax import methods
from fastadv_jax.training import model_config

EXAMPLES = ROOT / "experiments" / "examples"
PLUGIN_DIR = EXAMPLES / "plugin_method"
RFGSM = "fastat_example.rfgsm"
TINY_EVAL = ["--synthetic", "--steps=3", "--batch=16", "--eval_points=16", "--apgd_steps=3",
             "--square_queries=10"]


def _env(*paths) -> dict:
  """A user's shell: one CPU device, no inherited XLA_FLAGS, `paths` on PYTHONPATH."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_NUM_CPU_DEVICES"] = "1"
  env["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + [env.get("PYTHONPATH", "")])
  return env


def _run(argv, env=None, timeout=300) -> str:
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                        env=env or _env())
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
  return proc.stdout


def _accuracies(stdout: str) -> dict[str, float]:
  """Every `name_acc=<number>` printed, checked to be an accuracy."""
  found = {k: float(v) for k, v in re.findall(r"(\w*acc)=([0-9.]+)", stdout)}
  for k, v in found.items():
    assert 0.0 <= v <= 1.0, (k, v)
  return found


@pytest.mark.parametrize("script,method", [("own_loop_nnx.py", "gradalign"),
                                           ("own_loop_linen.py", "nfgsm")])
def test_own_training_loop_trains_and_evaluates(script, method):
  out = _run([sys.executable, str(EXAMPLES / script), f"--method={method}", "--pgd_steps=2",
              "--pgd_restarts=1"] + TINY_EVAL)
  acc = _accuracies(out)
  assert {"clean_acc", "pgd2_1_acc", "autoattack_acc"} <= set(acc), out
  assert acc["pgd2_1_acc"] <= acc["clean_acc"]
  assert acc["autoattack_acc"] <= acc["subset_clean_acc"]
  losses = [float(v) for v in re.findall(r"ce_adv=([0-9.]+)", out)]
  assert losses and all(np.isfinite(losses))
  reg = [float(v) for v in re.findall(r"gradalign=([0-9.]+)", out)]
  assert (max(reg) > 0) == (method == "gradalign")  # the term is there only for GradAlign


def test_autoattack_on_nnx_linen_and_an_imported_state_dict():
  out = _run([sys.executable, str(EXAMPLES / "autoattack_own_model.py")] + TINY_EVAL)
  for name in ("nnx", "linen", "torch_state_dict"):
    line = next(l for l in out.splitlines() if l.startswith(f"[{name}] clean_acc="))
    acc = _accuracies(line)
    assert acc["autoattack_acc"] <= acc["clean_acc"], line
  assert re.search(r"imported 16 tensors from .*state_dict\.npz", out), out


@pytest.fixture
def rfgsm_plugin(monkeypatch):
  """The plugin imported in this process (conftest's autouse fixture unregisters it and forgets
  the module afterwards, so other tests, e.g. ones over every preset, never see rfgsm)."""
  monkeypatch.syspath_prepend(str(PLUGIN_DIR))
  import importlib  # pylint: disable=import-outside-toplevel
  module = importlib.import_module(RFGSM)
  yield module
  for name in (RFGSM, "fastat_example"):
    sys.modules.pop(name, None)


def test_rfgsm_equals_its_closed_form_on_a_linear_model(rfgsm_plugin):
  """loss(z) = <w, z> has gradient w everywhere: from inside the box, delta =
  eps * (alpha * s + (1 - alpha) * sign(w)) with s the random signs; at the box's edge, clipped."""
  assert "rfgsm" in methods.names() and methods.presets()["rfgsm"] == ("rfgsm", {})
  b, d, eps, alpha = 4, 50, 0.05, 0.3
  w = jax.random.normal(jax.random.key(1), (d,))
  x = jax.random.uniform(jax.random.key(2), (b, d), minval=0.2, maxval=0.8)
  loss_fn = lambda z: z @ w  # noqa: E731
  key = jax.random.key(3)
  args = rfgsm_plugin.RFGSMArgs(alpha=alpha)
  delta = methods.perturb("rfgsm", loss_fn, x, jnp.zeros(b, jnp.int32), key, eps, args=args).delta
  from fastadv_jax import randomness  # pylint: disable=import-outside-toplevel
  s = rfgsm_plugin.noise_sign(randomness.batch_keys(key, b), x)
  expected = eps * (alpha * s + (1 - alpha) * jnp.sign(w))
  np.testing.assert_allclose(delta, expected, atol=1e-7)
  # Both random signs occur, so both magnitudes eps and (1 - 2 alpha) eps do.
  mags = np.unique(np.round(np.abs(np.asarray(delta)) / eps, 5))
  np.testing.assert_allclose(mags, [1 - 2 * alpha, 1.0], atol=1e-5)
  # At the box's edge: x = 0 with w < 0 can only stay at 0.
  x0 = jnp.zeros((b, d))
  d0 = methods.perturb("rfgsm", loss_fn, x0, jnp.zeros(b, jnp.int32), key, eps, args=args).delta
  assert float(jnp.min(d0)) >= 0.0 and float(jnp.max(jnp.abs(d0))) <= eps + 1e-7
  np.testing.assert_array_equal(np.asarray(d0)[:, np.asarray(w) < 0], 0.0)
  with pytest.raises(methods.ArgError, match="alpha"):
    rfgsm_plugin.RFGSMArgs(alpha=1.0)


def test_plugin_method_trains_sweeps_and_benchmarks_from_the_command_line(tmp_path):
  env = _env(PLUGIN_DIR, ROOT / "tests")
  wd = tmp_path / "rfgsm"
  _run([sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
        f"--config={ROOT}/configs/fashion_mnist.py:rfgsm,eps=32", f"--workdir={wd}"] + TINY_CLI
       + [f"--config.plugins={RFGSM}", "--config.method_args.rfgsm.alpha=0.3"], env)
  config = json.loads((wd / "config.json").read_text())
  assert config["method"] == "rfgsm" and config["plugins"] == RFGSM
  assert config["method_args"]["rfgsm"] == {"alpha": 0.3}
  assert 0.0 <= json.loads((wd / "results.json").read_text())["clean_acc"] <= 1.0

  out = _run([sys.executable, "experiments/sweep.py", "--config=configs/fashion_mnist.py",
              f"--plugins={RFGSM}", "--methods=rfgsm,fgsm", "--eps=32",
              f"--root={tmp_path}/sweep", "--dry_run"], env)
  assert re.search(rf"fashion_mnist\.py:rfgsm,eps=32,seed=0 .*--config\.plugins={RFGSM}", out), out

  bench = tmp_path / "bench.json"
  _run([sys.executable, "-m", "fastadv_jax.benchmark", f"--plugins={RFGSM}",
        "--models=small_cnn", "--methods=fgsm,rfgsm", "--batches=8", "--windows=1", "--steps=1",
        "--min_window_s=0", "--width=4", f"--out={bench}"], env)
  rows = {r["method"]: r for r in json.loads(bench.read_text())["rows"]}
  assert set(rows) == {"fgsm", "rfgsm"} and rows["rfgsm"]["images_per_s"] > 0


def test_the_plugin_package_declares_its_entry_point(tmp_path):
  """What `pip install` would install (a wheel, unpacked onto PYTHONPATH instead of into the
  shared virtualenv) is found by plugins.load_entry_points() without any --plugins flag."""
  source = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info into the source
  shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                    "*.egg-info"))
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                         "--no-build-isolation", "-w", str(tmp_path), str(source)],
                        capture_output=True, text=True, timeout=120)
  if proc.returncode != 0 and "No module named" in proc.stderr:
    pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  site = tmp_path / "site"
  with zipfile.ZipFile(next(tmp_path.glob("fastat_example-*.whl"))) as whl:
    whl.extractall(site)
  out = _run([sys.executable, "-c", "from fastadv_jax import methods; "
              "from fastadv_jax.runtime import plugins; "
              "print(plugins.load_entry_points()); print(methods.get('rfgsm').summary)"],
             _env(site))
  assert RFGSM in out and "R-FGSM" in out


def test_plugin_model_trains_and_evaluates(tmp_path, monkeypatch, mock_fashion_mnist):
  """The LeNet plugin through the trainer and the saved-run reader, in this process (the command
  line path of a plugin model, main then evaluate in subprocesses, is
  tests/test_model_plugins.py's)."""
  from conftest import tiny_config  # pylint: disable=import-outside-toplevel
  from fastadv_jax import models  # pylint: disable=import-outside-toplevel
  from fastadv_jax.training import evaluation, saved_run, train
  monkeypatch.syspath_prepend(str(EXAMPLES))
  importlib.import_module("plugin_model")  # before the config is built, as the command lines do
  config = tiny_config(plugins="plugin_model", model="lenet5", width=5, num_epochs=1)
  assert config.model_args.lenet5.width == 5  # the plugin's own field
  results = train.train_and_evaluate(config, str(tmp_path / "lenet"))
  models.unregister("lenet5")  # so that reading the run back must import the plugin again
  monkeypatch.delitem(sys.modules, "plugin_model")
  assert 0.0 <= results["pgd_acc"] <= results["clean_acc"] <= 1.0
  stored = json.loads((tmp_path / "lenet" / "config.json").read_text())
  assert stored["plugin_sources"] == {"plugin_model": {"package": None,
                                                       "file": str(EXAMPLES / "plugin_model.py")}}
  recorded, variables, _ = saved_run.load_run(str(tmp_path / "lenet"))
  assert recorded.model == "lenet5" and recorded.plugins == "plugin_model"
  assert "lenet5" in models.names()  # the run's plugin, imported again from its config.json
  assert recorded.model_args.lenet5.width == 5
  assert variables["params"]["conv0"]["kernel"].shape[-1] == 5
  assert set(variables["params"]) == set(model_config.create_model(recorded, 10).init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"])
  ev = evaluation.Evaluator(model_config.create_model(recorded, 10), 16)
  x = np.random.default_rng(0).integers(0, 256, size=(8, 28, 28, 1), dtype=np.uint8)
  assert 0.0 <= ev.clean_accuracy(variables, x, np.arange(8) % 10) <= 1.0