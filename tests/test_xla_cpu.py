"""The XLA:CPU flags: how they are applied per model, that oneDNN convolutions change no result,
and that the ResNets' materialised convolution input changes no value or derivative."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import benchmark, models
from fastadv_jax.runtime import xla_cpu
from fastadv_jax.training import model_config

ONEDNN = "--xla_cpu_experimental_onednn_custom_call=true"
NO_YNN_CONV = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def test_apply_adds_the_flags_once():
  env = {}
  assert xla_cpu.apply(env) == ONEDNN
  assert xla_cpu.apply(env) == ONEDNN  # idempotent
  env = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
  assert xla_cpu.apply(env) == f"--xla_cpu_multi_thread_eigen=false {ONEDNN}"


def test_apply_chooses_the_flags_by_model():
  for model in ("preact_resnet18", "wide_resnet"):
    env = {}
    assert xla_cpu.apply(env, flags=models.xla_flags(model)) == NO_YNN_CONV
  for model in ("cnn", "small_cnn", None):
    env = {}
    assert xla_cpu.apply(env, flags=models.xla_flags(model)) == ONEDNN
  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}  # the user's choice stays
  assert (xla_cpu.apply(env, flags=models.xla_flags("preact_resnet18"))
          == "--xla_cpu_experimental_ynn_fusion_type=")


def test_benchmark_refuses_models_with_different_flags():
  with pytest.raises(SystemExit, match="different XLA:CPU flags"):
    benchmark.main(["--models=cnn,preact_resnet18", "--methods=standard"])


def _conv(x, w, materialized):
  fn = xla_cpu.conv_materialized_input if materialized else jax.lax.conv_general_dilated
  return jnp.sum(jnp.sin(fn(x, w, (2, 2), ((1, 1), (1, 1)),
                            dimension_numbers=("NHWC", "HWIO", "NHWC"))))


def test_materialized_conv_input_changes_no_value_or_derivative():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  v = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  for derivative in (  # value, both gradients, GradAlign's reverse-over-reverse and jvp forms
      lambda f: f,
      lambda f: jax.grad(f, argnums=(0, 1)),
      lambda f: jax.grad(lambda x, w: jnp.vdot(jax.grad(f)(x, w), v), argnums=1),
      lambda f: jax.grad(lambda x, w: jax.jvp(lambda x: f(x, w), (x,), (v,))[1], argnums=1)):
    got = jax.jit(derivative(lambda x, w: _conv(x, w, True)))(x, w)
    want = jax.jit(derivative(lambda x, w: _conv(x, w, False)))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)


def test_materialize_is_a_barrier_on_cpu_only():
  x = jnp.ones((2, 4))
  for platform, barrier in (("cpu", True), ("cuda", False), ("tpu", False)):
    text = jax.export.export(jax.jit(lambda x: xla_cpu.materialize(x) * 2),
                             platforms=[platform])(x).mlir_module()
    assert ("optimization_barrier" in text) == barrier, platform


def test_apply_respects_the_user():
  env = {"XLA_FLAGS": "--xla_cpu_experimental_onednn_custom_call=false"}
  assert xla_cpu.apply(env) == "--xla_cpu_experimental_onednn_custom_call=false"
  env = {xla_cpu.OPT_OUT: "0"}
  assert xla_cpu.apply(env) == "" and "XLA_FLAGS" not in env


# One GradAlign training step of each CNN; prints the updated parameters' checksums and metrics.
_STEP = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
from conftest import tiny_config
from fastadv_jax.training import model_config, train_step
from fastadv_jax.training import train_state as ts
out = {}
for name, shape in (("cnn", (32, 32, 3)), ("small_cnn", (28, 28, 1))):
  c = tiny_config(model=name, method="fgsm", grad_align_lambda=0.5)
  model = model_config.create_model(c, 10)
  state = ts.create_train_state(c, model, jax.random.key(0), shape, 10)
  step = jax.jit(train_step.make_train_step(c, model, 10, axis_name=None))
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (16,) + shape, dtype=np.uint8)),
           "label": jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))}
  state, metrics = step(state, batch, jax.random.key(1))
  leaves = jax.tree.leaves(state.params)
  out[name] = [float(jnp.sum(jnp.abs(x))) for x in leaves] + [
      float(metrics["train_loss"]), float(metrics["train_reg"]), float(metrics["l2_grads"])]
print("RESULT " + json.dumps(out))
"""


def _run_step(onednn: bool) -> dict:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1",
             XLA_FLAGS=ONEDNN if onednn else "", **{xla_cpu.OPT_OUT: "0"})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _STEP], capture_output=True, text=True, env=env,
                        cwd=root, timeout=300)
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  assert line, proc.stderr[-3000:]
  return json.loads(line[0][len("RESULT "):])


def test_onednn_convolutions_give_the_same_step():
  xla, onednn = _run_step(onednn=False), _run_step(onednn=True)
  for model in ("cnn", "small_cnn"):
    assert np.all(np.isfinite(xla[model])) and xla[model][-2] > 0, model  # GradAlign term active
    np.testing.assert_allclose(onednn[model], xla[model], rtol=2e-4, err_msg=model)


@pytest.mark.parametrize("model_name,materialized", [("preact_resnet18", True),
                                                     ("small_cnn", False)])
def test_resnet_convolutions_materialize_their_input(model_name, materialized):
  from conftest import tiny_config
  model = model_config.create_model(tiny_config(model=model_name), 10)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  text = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text()
  convolutions = text.count("stablehlo.convolution")
  assert convolutions >= 2
  assert text.count("stablehlo.optimization_barrier") == (convolutions if materialized else 0)


def test_main_runs_a_resnet_under_the_resnet_flags(tmp_path):
  """`main` applies the flags of the config's model before JAX starts, and records them."""
  from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI, USERS_XLA_FLAGS
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # as a user's shell has it
  env.update({"JAX_NUM_CPU_DEVICES": "1", USERS_XLA_FLAGS: "1"})
  argv = [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
          f"--config={ROOT}/configs/default.py", f"--workdir={tmp_path / 'wd'}"] + TINY_CLI + [
              "--config.model=preact_resnet18",
              "--config.model_args.preact_resnet18.stage_widths=(4,4,4,4)"]
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "wd" / "results.json").read_text())
  assert results["xla_flags"] == NO_YNN_CONV
  assert "will not take effect" not in proc.stderr  # applied before the backend started
  proc = subprocess.run([sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.evaluate",
                         f"--workdir={tmp_path / 'wd'}", "--n_eval=16", "--pgd_steps=2",
                         "--pgd_restarts=1"], capture_output=True, text=True, cwd=ROOT,
                        timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads(next((tmp_path / "wd").glob("eval_last_*.json")).read_text())
  assert evaluated["xla_flags"] == NO_YNN_CONV
