"""AutoAttack components as records in a live registry: the built-in ones, a refused clash, and
a component from outside the package (tests/plugins/my_attack.py) used from Python and from
`python -m fastadv_jax.evaluate --plugins=my_attack`."""
import dataclasses
import importlib
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import MOCK_DATA_CLI, ROOT, tiny_config
from fastadv_jax import autoattack
from fastadv_jax.autoattack import device_runs
from fastadv_jax.training import evaluation, train
from test_autoattack import EPS, _exact_worst_margin, _linear_problem

PLUGINS = ROOT / "tests" / "plugins"


def _import_plugin():
  """The plugin under the module name `--plugins=my_attack` imports it as."""
  if str(PLUGINS) not in sys.path:
    sys.path.insert(0, str(PLUGINS))
  return importlib.import_module("my_attack")


def test_builtin_components_are_registered_records():
  builtin = {"apgd-ce", "apgd-t", "apgd-dlr", "fab-t", "square"}
  assert builtin <= set(autoattack.names()) == set(autoattack.ATTACKS)
  assert {n for n in builtin if autoattack.get(n).targeted} == {"apgd-t", "fab-t"}
  assert {n for n in builtin if not autoattack.get(n).gradient_based} == {"square"}
  assert [autoattack.get(n).block for n in ("apgd-ce", "fab-t", "square")] == [10, 10, 20]
  # The runner asks the record: no attack is named in the per-device phase function.
  source = inspect.getsource(device_runs.phase_on_chunk)
  assert not any(f'"{n}"' in source for n in builtin) and "startswith" not in source


def test_a_taken_name_refuses_a_different_record():
  square = autoattack.get("square")
  autoattack.register(square)  # the same record again: a no-op
  with pytest.raises(ValueError, match="'square' is already registered"):
    autoattack.register(dataclasses.replace(square, block=5))
  assert autoattack.get("square") is square
  with pytest.raises(TypeError, match="Component records"):
    autoattack.register("square")
  with pytest.raises(ValueError, match="without commas"):
    dataclasses.replace(square, name="a,b")


def test_a_plugin_component_runs_in_the_composition():
  plugin = _import_plugin()
  assert autoattack.get("my-attack") is plugin.RECORD
  assert "my-attack" in autoattack.ATTACKS and "my-attack" in autoattack.TARGETED
  assert evaluation.parse_attack_spec("pgd,my-attack") == (True, ("my-attack",))
  w, x, y, logits_fn = _linear_problem()
  worst = _exact_worst_margin(w, x, y, EPS)
  clear = np.abs(worst) > 1e-3
  # Alone, the plugin's one signed step per target class is exact on a linear model.
  alone = autoattack.evaluate(logits_fn, x, y, EPS, "my-attack", progress=False)
  np.testing.assert_array_equal(alone.robust[clear], worst[clear] > 0)
  assert 0 < np.sum(worst[clear] > 0) < np.sum(clear)
  res = autoattack.evaluate(logits_fn, x, y, EPS, "apgd-ce,my-attack", progress=False,
                            apgd_steps=2)
  np.testing.assert_array_equal(res.robust[clear], worst[clear] > 0)
  counts = res.summary()["autoattack_robust_counts"]
  assert list(counts) == ["apgd-ce", "my-attack"] and counts["my-attack"] == res.robust.sum()
  # After a one-query Square it breaks what Square missed: the result is still exact.
  res = autoattack.evaluate(logits_fn, x, y, EPS, "square,my-attack", progress=False,
                            square_queries=1)
  np.testing.assert_array_equal(res.robust[clear], worst[clear] > 0)
  assert np.any(res.broken_by == 1)  # points only the plugin broke
  counts = res.summary()["autoattack_robust_counts"]
  assert counts["square"] > counts["my-attack"] == res.robust.sum()


def test_a_plugin_component_from_the_evaluate_command(tmp_path, mock_fashion_mnist):
  train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))
  base = [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.evaluate", f"--workdir={tmp_path}",
          "--n_eval=16"]
  # Refusals come before any data is read: the plain command line (no TFDS mock) is enough.
  plain = [sys.executable, "-m", "fastadv_jax.evaluate", f"--workdir={tmp_path}", "--n_eval=16"]
  proc = subprocess.run(plain + ["--attack=my-attack"], capture_output=True, text=True, cwd=ROOT,
                        timeout=300, env=env)
  assert proc.returncode == 2 and "--attack: unknown attack 'my-attack'" in proc.stderr
  proc = subprocess.run(base + ["--plugins=my_attack", "--attack=my-attack"], capture_output=True,
                        text=True, cwd=ROOT, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((tmp_path / "eval_last_eps0.1000_n16_aa-my-attack.json").read_text())
  assert out["autoattack_attacks"] == ["my-attack"]
  assert list(out["autoattack_robust_counts"]) == ["my-attack"]
  assert out["autoattack_robust_counts"]["my-attack"] / 16 == out["autoattack_acc"]
  assert out["autoattack_acc"] <= out["clean_acc"]
  proc = subprocess.run(plain + ["--plugins=no_such_module", "--attack=pgd"], capture_output=True,
                        text=True, cwd=ROOT, timeout=300, env=env)
  assert proc.returncode == 2 and "--plugins: plugin 'no_such_module'" in proc.stderr
