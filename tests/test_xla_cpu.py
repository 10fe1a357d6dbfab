"""The default XLA:CPU flags: how they are applied, and that oneDNN convolutions change no result."""
import json
import os
import subprocess
import sys

import numpy as np
from fastadv_jax import xla_cpu

ONEDNN = "--xla_cpu_experimental_onednn_custom_call=true"


def test_apply_adds_the_flags_once():
  env = {}
  assert xla_cpu.apply(env) == ONEDNN
  assert xla_cpu.apply(env) == ONEDNN  # idempotent
  env = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
  assert xla_cpu.apply(env) == f"--xla_cpu_multi_thread_eigen=false {ONEDNN}"


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
from fastadv_jax import models, train_step
from fastadv_jax import train_state as ts
out = {}
for name, shape in (("cnn", (32, 32, 3)), ("small_cnn", (28, 28, 1))):
  c = tiny_config(model=name, method="fgsm", grad_align_lambda=0.5)
  model = models.create_model(c, 10)
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
