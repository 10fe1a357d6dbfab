"""The two engines (engines.py): jit + shard_map on a Mesh computes what pmap computes, for
every registered method, with the state held as global jax.Arrays laid out as documented."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI, USERS_XLA_FLAGS, tiny_config
from fastadv_jax import methods, parallel
from fastadv_jax.training import (checkpointing, engines, metric_writers, model_config, train,
                                  train_step)
from fastadv_jax.training import train_state as ts
from test_reliability import _Killed, _raise_in
from test_train_step import N_EXAMPLES, _batch, DEVICE_SPLIT_RTOL, _max_rel_err

N_DEV = 4  # 40 training examples over 4 devices: 10 rows each, no padding; 3 pads (below)

# Settings that keep each method cheap; every registered method is run.
CHEAP = {"pgd": {"steps": 2}, "pgd_corner": {"steps": 2}, "pgd_at": {"steps": 2},
         "free": {"replay": 2}, "trades": {"steps": 2}, "elle": {"lam": 10.0},
         "nuat": {"ramp": 0.05}}


def _config(method, **extra):
  args = {method: CHEAP[method]} if method in CHEAP else {}
  return tiny_config(method=method, grad_align_lambda=0.5 if method == "fgsm" else 0.0,
                     crop_padding=2, flip=True, batch_size=16, method_args=args, **extra)


def _run(config, engine, steps=2, n_examples=N_EXAMPLES):
  """`steps` steps of the engine's compiled step on fixed batches; the host state after them
  and each step's logged metrics."""
  model = model_config.create_model(config, 10, bn_axis_name=parallel.AXIS)
  state = ts.create_train_state(config, model, jax.random.key(0), (28, 28, 1), 10,
                                n_examples=n_examples)
  fn = engine.compile_step(train_step.make_train_step(config, model, 10))
  placed = engine.place_state(state)
  rows = []
  for i in range(steps):
    batch = _batch(seed=i)
    if n_examples != N_EXAMPLES:  # positions in a training set of n_examples
      rng = np.random.default_rng(i)
      batch["index"] = np.sort(rng.permutation(n_examples)[:16]).astype(np.int32)
    placed, m = fn(placed, engine.place_batch(batch), jax.random.key(42))
    rows.append(jax.tree.map(lambda v: float(np.asarray(v)[0]), engine.local_metrics(m)))
  assert engine.step_of(placed) == steps
  return engine.host_state(placed), rows, placed


@pytest.mark.parametrize("method", methods.names())
def test_shard_map_step_equals_pmap_step(method):
  devices = jax.local_devices()[:N_DEV]
  c = _config(method)
  one, m1, _ = _run(c, engines.PmapEngine(devices))
  two, m2, placed = _run(c, engines.ShardMapEngine(devices))
  assert (_max_rel_err((one.params, one.batch_stats), (two.params, two.batch_stats))
          < DEVICE_SPLIT_RTOL)
  for a, b in zip(m1, m2):
    assert a.keys() == b.keys()
    for k in a:
      assert b[k] == pytest.approx(a[k], rel=DEVICE_SPLIT_RTOL, abs=1e-7), k
  for part in ("opt_state", "method_state", "ema", "carried_delta", "example_state"):
    a, b = getattr(one, part), getattr(two, part)
    assert (a is None) == (b is None), part
    if a is not None and jax.tree.leaves(a):
      assert _max_rel_err(a, b) < DEVICE_SPLIT_RTOL, part
  # Global arrays on the mesh: replicated parameters, rows split over the axis.
  assert all(isinstance(v, jax.Array) and v.sharding.spec == P()
             for v in jax.tree.leaves(placed.params))
  for v in jax.tree.leaves((placed.carried_delta, placed.example_state)):
    assert v.sharding.spec == P(parallel.AXIS) and len(v.sharding.device_set) == N_DEV


def test_example_rows_are_padded_to_whole_blocks_per_device():
  """37 examples over 4 devices: blocks of 10 rows, the last 3 rows padding that no step
  touches; the host state has the 37 real rows, equal to pmap's."""
  devices = jax.local_devices()[:N_DEV]
  c = _config("fgsm_pgi")
  one, _, _ = _run(c, engines.PmapEngine(devices), n_examples=37)
  two, _, placed = _run(c, engines.ShardMapEngine(devices), n_examples=37)
  for k, table in placed.example_state.items():
    assert table.shape[0] == 40 and two.example_state[k].shape[0] == 37
    np.testing.assert_array_equal(np.asarray(table)[37:], 0)
    assert np.any(np.asarray(table)[:37] != 0)
  assert _max_rel_err(one.example_state, two.example_state) < DEVICE_SPLIT_RTOL


def test_unknown_engine_is_refused():
  with pytest.raises(ValueError, match="parallelism: must be one of pmap, shard_map"):
    engines.create("pjit")


def test_state_bytes_count_each_devices_copy():
  """pmap keeps one copy of the parameters per device, shard_map's replicated arrays too (a
  copy per device); sharded rows are counted once."""
  devices = jax.local_devices()[:N_DEV]
  c = _config("fgsm_pgi")
  model = model_config.create_model(c, 10, bn_axis_name=parallel.AXIS)
  state = ts.create_train_state(c, model, jax.random.key(0), (28, 28, 1), 10,
                                n_examples=N_EXAMPLES)
  rows = sum(np.asarray(t).nbytes for t in state.example_state.values())
  rest = sum(jnp.asarray(v).nbytes for v in jax.tree.leaves(state.replace(example_state=None)))
  for engine in (engines.PmapEngine(devices), engines.ShardMapEngine(devices)):
    assert engines.state_bytes(engine.place_state(state)) == N_DEV * rest + rows


def test_metrics_have_one_row_per_device_as_under_pmap():
  devices = jax.local_devices()[:N_DEV]
  c = _config("fgsm")
  model = model_config.create_model(c, 10, bn_axis_name=parallel.AXIS)
  state = ts.create_train_state(c, model, jax.random.key(0), (28, 28, 1), 10)
  engine = engines.ShardMapEngine(devices)
  fn = engine.compile_step(train_step.make_train_step(c, model, 10))
  _, m = fn(engine.place_state(state), engine.place_batch(_batch()), jax.random.key(0))
  assert m["train_loss"].shape == (N_DEV,) and m["train_loss"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(m["train_loss"]), np.asarray(m["train_loss"])[0])


def _comparable_results(wd):
  r = json.loads((pathlib.Path(wd) / "results.json").read_text())
  return {k: v for k, v in r.items()
          if k not in ("config", "train_time_s", "wall_time_s", "step_time_s")}


def _comparable_rows(wd):
  return [{k: v for k, v in row.items() if "time" not in k}
          for row in metric_writers.read_metrics(str(wd))]


def test_a_shard_map_run_writes_what_a_pmap_run_writes(tmp_path, mock_fashion_mnist):
  """FGSM-PGI's per-example rows and weight averaging on, 8 devices: the command line with
  parallelism=shard_map, and a shard_map run killed in iteration 4 and resumed from its
  checkpoint at 3 (Orbax restores the global arrays), write the results.json and metrics.jsonl
  of the pmap run."""
  extra = dict(method="fgsm_pgi", grad_align_lambda=0.0, ema_decay=0.5, num_epochs=2,
               log_every=1, eval_every=2, checkpoint_every=3)
  train.train_and_evaluate(tiny_config(**extra), str(tmp_path / "pmap"))
  want_results, want_rows = _comparable_results(tmp_path / "pmap"), _comparable_rows(
      tmp_path / "pmap")
  config = tiny_config(parallelism="shard_map", **extra)
  when = lambda self, step: step == 4  # noqa: E731
  with _raise_in(train._Run, "step", _Killed, when) as fired, pytest.raises(_Killed):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert fired and checkpointing.Checkpointer(str(tmp_path / "resumed")).latest_step() == 3
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert _comparable_results(tmp_path / "resumed") == want_results
  assert _comparable_rows(tmp_path / "resumed") == want_rows
  flags = ([f"--config.{k}={v}" for k, v in extra.items()] + ["--config.parallelism=shard_map"]
           + ["--config.final_pgd_steps=3", "--config.final_pgd_restarts=2"])  # as tiny_config
  cli = subprocess.run(
      [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
       f"--config={ROOT}/configs/default.py", f"--workdir={tmp_path / 'cli'}"] + TINY_CLI + flags,
      capture_output=True, text=True, cwd=ROOT, timeout=300,
      env=dict(os.environ, JAX_NUM_CPU_DEVICES="8", **{USERS_XLA_FLAGS: "1"}))
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert _comparable_results(tmp_path / "cli") == want_results
  assert _comparable_rows(tmp_path / "cli") == want_rows
  # One process with one device reads the weights a run on an 8-device mesh saved (Orbax
  # refuses to restore global arrays onto another topology without a target).
  from fastadv_jax.training import saved_run
  _, want, step = saved_run.load_run(str(tmp_path / "cli"), "averaged")
  read = subprocess.run(
      [sys.executable, "-c", "import sys, numpy as np, jax; "
       "from fastadv_jax.training import saved_run; "
       "_, v, s = saved_run.load_run(sys.argv[1], 'averaged'); "
       "np.savez(sys.argv[2], step=s, *jax.tree.leaves(v))",
       str(tmp_path / "cli"), str(tmp_path / "one_device.npz")],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
  assert read.returncode == 0, read.stderr[-3000:]
  got = np.load(tmp_path / "one_device.npz")
  assert int(got["step"]) == step == want_results["iterations"]
  for i, leaf in enumerate(jax.tree.leaves(want)):
    np.testing.assert_array_equal(got[f"arr_{i}"], leaf)
