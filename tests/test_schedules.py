"""Learning-rate and momentum schedules: PyTorch's OneCycleLR (per iteration and per epoch, as
the fast-AT benchmark steps it), the optimiser it drives, and the default optimiser unchanged."""
from __future__ import annotations

import json
import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import TORCH_PY, load_config, needs_torch, tiny_config
from fastadv_jax.training import config_validation, schedules
from fastadv_jax.training import train_state as ts



def _torch_onecycle(step: int, total: int, max_lr: float):
  """(lr, momentum) of torch.optim.lr_scheduler.OneCycleLR.get_lr at last_epoch = step, its
  defaults (pct_start 0.3, cos, div 25, final_div 1e4, momentum 0.85/0.95), transcribed."""
  initial = max_lr / 25.0
  phases = [(float(0.3 * total) - 1, initial, max_lr, 0.95, 0.85),
            (total - 1, max_lr, initial / 1e4, 0.85, 0.95)]
  cos = lambda a, b, pct: b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
  start = 0
  for i, (end, lr0, lr1, m0, m1) in enumerate(phases):
    if step <= end or i == len(phases) - 1:
      pct = (step - start) / (end - start)
      return cos(lr0, lr1, pct), cos(m0, m1, pct)
    start = end
  raise AssertionError


def _onecycle_config(**kw):
  c = load_config()
  c.lr_schedule, c.lr_max, c.num_epochs, c.schedule_unit = "onecycle", 0.1, 100, "epoch"
  c.update(kw)
  return c


def test_onecycle_per_epoch_is_pytorch_stepped_after_each_epoch():
  spe = 7
  c = _onecycle_config()
  lr = jax.jit(schedules.lr_schedule(c, spe))
  mom = jax.jit(schedules.momentum_schedule(c, spe))
  for e in range(100):
    want_lr, want_m = _torch_onecycle(e, 100, 0.1)
    for it in (e * spe, e * spe + 3, e * spe + spe - 1):  # held for the whole epoch
      assert float(lr(jnp.int32(it))) == pytest.approx(want_lr, rel=2e-6, abs=1e-12), (e, it)
      assert float(mom(jnp.int32(it))) == pytest.approx(want_m, rel=1e-6), (e, it)
  # The benchmark's landmarks: 0.004 at epoch 0, the peak 0.1 at epoch 29, ~4e-7 at epoch 99,
  # momentum 0.95 -> 0.85 at the peak -> 0.95.
  assert float(lr(0)) == pytest.approx(0.004, rel=1e-6)
  assert float(lr(29 * spe)) == pytest.approx(0.1, rel=1e-6)
  assert float(lr(30 * spe)) < 0.1
  assert float(lr(99 * spe)) == pytest.approx(4e-7, rel=1e-4)
  assert [float(mom(e * spe)) for e in (0, 29, 99)] == pytest.approx([0.95, 0.85, 0.95])


def test_onecycle_per_iteration_spans_all_iterations():
  spe, epochs = 11, 3
  c = _onecycle_config(num_epochs=epochs, schedule_unit="iteration", lr_max=0.2)
  total = schedules.total_steps(c, spe)
  lr, mom = schedules.lr_schedule(c, spe), schedules.momentum_schedule(c, spe)
  got = np.array([[float(lr(s)), float(mom(s))] for s in range(total)])
  want = np.array([_torch_onecycle(s, total, 0.2) for s in range(total)])
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12)
  assert len(set(got[:spe, 0])) == spe  # moves every iteration


@needs_torch
def test_onecycle_matches_torch():
  script = """
import json, torch
def run(total, n):
  p = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=5e-4)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
  out = []
  for _ in range(n):
    out.append([opt.param_groups[0]['lr'], opt.param_groups[0]['momentum']])
    opt.step(); sched.step()
  return out
print(json.dumps({'epoch': run(100, 100), 'iter': run(37, 37)}))
"""
  proc = subprocess.run([str(TORCH_PY), "-c", script], capture_output=True, text=True, timeout=120)
  if proc.returncode != 0:
    pytest.skip(f"torch not usable: {proc.stderr[-300:]}")
  ref = json.loads(proc.stdout.strip().splitlines()[-1])
  c = _onecycle_config()  # per epoch, total 100, 5 iterations an epoch
  lr, mom = schedules.lr_schedule(c, 5), schedules.momentum_schedule(c, 5)
  got = [[float(lr(e * 5 + 4)), float(mom(e * 5 + 4))] for e in range(100)]
  np.testing.assert_allclose(got, ref["epoch"], rtol=2e-6, atol=1e-12)
  c = _onecycle_config(num_epochs=1, schedule_unit="iteration")  # 37 iterations
  lr, mom = schedules.lr_schedule(c, 37), schedules.momentum_schedule(c, 37)
  got = [[float(lr(s)), float(mom(s))] for s in range(37)]
  np.testing.assert_allclose(got, ref["iter"], rtol=2e-6, atol=1e-12)


def _params_and_grads(steps):
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(steps)]
  return params, grads


def test_onecycle_sgd_is_pytorch_sgd_with_scheduled_lr_and_momentum():
  spe, epochs, wd = 2, 5, 0.05
  c = _onecycle_config(num_epochs=epochs, weight_decay=wd, momentum=0.5)
  tx = ts.make_optimizer(c, spe)
  params, grads = _params_and_grads(epochs * spe)
  p = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(p)
  want = {k: v.astype(np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in want.items()}
  for i, g in enumerate(grads):
    lr, m = _torch_onecycle(i // spe, epochs, 0.1)
    for k in want:  # PyTorch SGD: d = g + wd p; buf = m buf + d (buf = d at first); p -= lr buf
      d = g[k] + wd * want[k]
      buf[k] = d if i == 0 else m * buf[k] + d
      want[k] = want[k] - lr * buf[k]
    updates, opt_state = tx.update(jax.tree.map(jnp.asarray, g), opt_state, p)
    p = optax.apply_updates(p, updates)
    for k in want:
      np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=f"{i} {k}")


def test_onecycle_adam_cycles_b1():
  c = _onecycle_config(num_epochs=4, optimizer="adam")
  tx = ts.make_optimizer(c, 3)
  params, grads = _params_and_grads(4)
  state = tx.init(jax.tree.map(jnp.asarray, params))
  b1 = []
  for g in grads:
    _, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    b1.append(float(state[1].hyperparams["b1"]))
  assert b1 == pytest.approx([_torch_onecycle(i // 3, 4, 0.1)[1] for i in range(4)])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("schedule", ["cyclic", "piecewise", "constant"])
def test_default_optimizers_unchanged(optimizer, schedule):
  """Without onecycle the optimiser is chain(add_decayed_weights, sgd | adam) as before: same
  opt_state tree (old checkpoints restore) and the same updates, bit for bit."""
  c = tiny_config(optimizer=optimizer, lr_schedule=schedule)
  spe = 3
  tx = ts.make_optimizer(c, spe)
  lr = schedules.lr_schedule(c, spe)
  inner = optax.sgd(lr, momentum=c.momentum) if optimizer == "sgd" else optax.adam(lr)
  ref = optax.chain(optax.add_decayed_weights(c.weight_decay), inner)
  params, grads = _params_and_grads(4)
  p = jax.tree.map(jnp.asarray, params)
  s, s_ref = tx.init(p), ref.init(p)
  assert jax.tree.structure(s) == jax.tree.structure(s_ref)
  for g in grads:
    u, s = tx.update(g, s, p)
    u_ref, s_ref = ref.update(g, s_ref, p)
    for a, b in zip(jax.tree.leaves((u, s)), jax.tree.leaves((u_ref, s_ref))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p = optax.apply_updates(p, u)
  onecycle = ts.make_optimizer(tiny_config(optimizer=optimizer, lr_schedule="onecycle"), spe)
  assert jax.tree.structure(onecycle.init(p)) != jax.tree.structure(s)  # only onecycle differs


def test_epoch_unit_holds_existing_schedules_per_epoch():
  c = load_config()
  c.lr_schedule, c.num_epochs, c.lr_max, c.schedule_unit = "piecewise", 8, 0.2, "epoch"
  lr = schedules.lr_schedule(c, 5)
  # Epoch e at t = e epochs: lr_max for epochs 0-3, /10 for 4-5, /100 for 6-7.
  want = [0.2] * 4 + [0.02] * 2 + [0.002] * 2
  assert [float(lr(e * 5 + j)) for e in range(8) for j in range(5)] == pytest.approx(
      [w for w in want for _ in range(5)])
  c.lr_schedule = "cyclic"
  lr = schedules.lr_schedule(c, 5)
  assert [float(lr(e * 5 + 4)) for e in (0, 1, 4)] == pytest.approx([0.0, 0.2 / 3.2, 0.2 * 4 / 4.8])
  assert schedules.momentum_schedule(c, 5) is None


def test_config_checks_schedule_fields():
  c = tiny_config(lr_schedule="onecycle", schedule_unit="epoch")
  config_validation.validate_config(c)
  c.schedule_unit = "step"
  with pytest.raises(config_validation.ConfigError, match="config.schedule_unit"):
    config_validation.validate_config(c)


def test_onecycle_train_step_runs():
  from test_train_step import _run  # pylint: disable=import-outside-toplevel
  c = tiny_config(method="fgsm", grad_align_lambda=0.0, lr_schedule="onecycle",
                  schedule_unit="epoch", num_epochs=4, lr_max=0.1)
  state, metrics, _ = _run(c, 1, steps=2)
  hp = state.opt_state[1].hyperparams
  assert float(hp["momentum"]) == pytest.approx(0.95)
  assert float(hp["learning_rate"]) == pytest.approx(_torch_onecycle(0, 4, 0.1)[0])
  assert metrics[0]["lr"] == pytest.approx(_torch_onecycle(0, 4, 0.1)[0])
  assert all(np.isfinite(m["train_loss"]) for m in metrics)
