"""The accelerator programs, checked without an accelerator: the bf16 GradAlign train step (alone
and as both engines run it over devices) and the PGD evaluation lowered for `cuda` and `tpu` on
this CPU (jax.export). Convolutions and
matmuls run in bfloat16; parameters, losses and metrics are float32; attack loops stay rolled;
nothing CPU-only (oneDNN custom calls, unrolled loops) leaks in."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fastadv_jax import attacks, parallel
from fastadv_jax.training import engines, eval_programs, evaluation, model_config, train_step
from fastadv_jax.training import train_state as ts

SHAPE = (16, 28, 28, 1)


def _step_program(platform, derivative="double_backprop"):
  c = tiny_config(method="fgsm", grad_align_lambda=0.5, half_precision=True,
                  grad_align_derivative=derivative)
  model = model_config.create_model(c, 10)
  state = ts.create_train_state(c, model, jax.random.key(0), SHAPE[1:], 10)
  step = jax.jit(train_step.make_train_step(c, model, 10, axis_name=None))
  batch = {"image": jnp.zeros(SHAPE, jnp.uint8), "label": jnp.zeros(SHAPE[:1], jnp.int32)}
  return jax.export.export(step, platforms=[platform])(state, batch, jax.random.key(1))


def _ops(text, op):
  return [ln for ln in text.splitlines() if f"stablehlo.{op}" in ln]


def _operand_types(line):
  sig = line.rsplit(":", 1)[-1]
  return re.findall(r"tensor<[^>]*x(bf16|f32|f16|f64)>", sig)


@pytest.mark.parametrize("platform,derivative", [("cuda", "double_backprop"),
                                                 ("tpu", "double_backprop"), ("cuda", "jvp")])
def test_bf16_gradalign_step_lowers_with_bf16_compute_and_f32_state(platform, derivative):
  exp = _step_program(platform, derivative)
  text = exp.mlir_module()
  convs, dots = _ops(text, "convolution"), _ops(text, "dot_general")
  assert convs and dots
  for line in convs + dots:  # forward, input-gradient, weight-gradient and double-backward
    assert set(_operand_types(line)) == {"bf16"}, line
  state_avals, _, _ = jax.tree.unflatten(exp.in_tree, exp.in_avals)[0]
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state_avals.params))
  _, metrics = jax.tree.unflatten(exp.out_tree, exp.out_avals)
  for k in ("train_loss", "train_ce", "train_reg", "l2_grads"):
    assert metrics[k].dtype == jnp.float32, k
  # Input gradients come back to float32 before the cosine (losses.at_least_f32).
  assert any("bf16" in ln and "f32" in ln for ln in _ops(text, "convert"))
  assert "custom_call" not in text or not re.search(r"onednn|xla_cpu|ynn", text, re.I)


def test_the_cpu_program_differs_only_where_it_should():
  """Lowered for CPU the same step has the same bf16 convolutions (the check above is not
  vacuous: it passes for the real program)."""
  text = _step_program("cpu").mlir_module()
  assert all(set(_operand_types(ln)) == {"bf16"} for ln in _ops(text, "convolution"))


@pytest.mark.parametrize("platform,rolled", [("cuda", True), ("tpu", True), ("cpu", False)])
def test_pgd_evaluation_keeps_its_loop_rolled_on_accelerators(platform, rolled):
  c = tiny_config()
  model = model_config.create_model(c, 10, half_precision=False)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE[1:]), train=False)
  ev = evaluation.Evaluator(model, 16, devices=jax.local_devices()[:1])
  carry = attacks.restarts_init(jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1], jnp.int32), True)
  # The Evaluator's per-device restart program, as it pmaps it.
  fn = jax.jit(functools.partial(eval_programs.pgd_restart, model, ev.step_alpha, ev.norm),
               static_argnums=(8,))
  args = (variables, carry, jnp.zeros(SHAPE, jnp.uint8), jnp.zeros(SHAPE[:1], jnp.int32),
          jnp.arange(16, dtype=jnp.int32), jax.random.key(0), jnp.float32(0.1), jnp.int32(0), 10)
  text = jax.export.export(fn, platforms=[platform])(*args).mlir_module()
  convs = _ops(text, "convolution")
  assert all(set(_operand_types(ln)) == {"f32"} for ln in convs)  # evaluation is float32
  # Rolled, the loop body holds one step's convolutions (6 here: forward and input gradient
  # of two conv layers, plus the final forward); unrolled, each of the 10 steps has its own.
  if rolled:
    assert len(convs) < 10 and "stablehlo.while" in text
  else:
    assert len(convs) > 40


def _engine_step_program(engine_name, platform):
  """The bf16 GradAlign step as each engine runs it on 2 devices, exported for `platform`:
  pmap's (inside a jit, which is how jax.export takes it) and jit + shard_map's."""
  c = tiny_config(method="fgsm", grad_align_lambda=0.5, half_precision=True)
  model = model_config.create_model(c, 10, bn_axis_name=parallel.AXIS)
  state = ts.create_train_state(c, model, jax.random.key(0), SHAPE[1:], 10)
  step = train_step.make_train_step(c, model, 10)
  engine = engines.create(engine_name, jax.local_devices()[:2])
  batch = engine.place_batch({"image": np.zeros(SHAPE, np.uint8),
                              "label": np.zeros(SHAPE[:1], np.int32)})
  placed = engine.place_state(state)
  if engine_name == "pmap":
    fn = jax.jit(engine.compile_step(step))
  else:
    fn = engine.jit_step(step, placed)
  return jax.export.export(fn, platforms=[platform])(placed, batch, jax.random.key(1))


@pytest.mark.parametrize("engine_name", ["pmap", "shard_map"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_both_engines_lower_for_accelerators_with_their_collectives(engine_name, platform):
  exp = _engine_step_program(engine_name, platform)
  text = exp.mlir_module()
  assert exp.nr_devices == 2
  # The cross-device means (gradients, BatchNorm statistics, GradAlign's counts) are there.
  assert len(_ops(text, "all_reduce")) >= 3
  convs = _ops(text, "convolution")
  assert convs and all(set(_operand_types(ln)) == {"bf16"} for ln in convs)
  assert "custom_call" not in text or not re.search(r"onednn|xla_cpu|ynn", text, re.I)
