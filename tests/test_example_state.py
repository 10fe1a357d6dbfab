"""Per-example method state: rows keyed by training-set position, spread over devices."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fastadv_jax import methods, parallel
from fastadv_jax.methods.base import AttackInputs, Method, Perturbation
from fastadv_jax.training import model_config, train_step
from fastadv_jax.training import train_state as ts


@dataclasses.dataclass(frozen=True)
class CountArgs:
  pass


def _rows(args, input_shape):
  del args
  return {"visits": jax.ShapeDtypeStruct((), jnp.int32),
          "label_sum": jax.ShapeDtypeStruct((2,), jnp.float32)}


def _perturb(inp: AttackInputs) -> Perturbation:
  r = inp.example_rows
  new = {"visits": r["visits"] + 1,
         "label_sum": r["label_sum"] + jnp.stack([inp.y, 2 * inp.y], -1).astype(jnp.float32)}
  return Perturbation(jnp.zeros_like(inp.x), example_rows=new)


COUNTER = Method("visit_counter", "test: counts each example's visits", _perturb, CountArgs,
                 example_state=_rows)


@pytest.fixture
def counter():
  methods.register(COUNTER)
  yield COUNTER


N = 37  # not a multiple of the 8 devices: the last block is padded


def _batches(steps, n=16):
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = np.sort(rng.permutation(N)[:n]).astype(np.int32)
    yield {"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, (n,)).astype(np.int32), "index": idx}


def _train(n_dev, steps=4):
  c = tiny_config(method="visit_counter", grad_align_lambda=0.0)
  model = model_config.create_model(c, 10, bn_axis_name=parallel.AXIS)
  state = ts.create_train_state(c, model, jax.random.key(0), (28, 28, 1), 10, n_examples=N)
  fn = parallel.pmap_train_step(train_step.make_train_step(c, model, 10),
                                devices=jax.local_devices()[:n_dev])
  rstate = parallel.replicate(state, n_dev)
  for b in _batches(steps):
    rstate, _ = fn(rstate, parallel.shard(b, n_dev), jax.random.key(1))
  return parallel.unreplicate(rstate)


def test_rows_are_read_and_written_at_their_examples_on_any_device_count(counter):
  del counter
  visits, sums = np.zeros(N, np.int32), np.zeros((N, 2), np.float32)
  for b in _batches(4):
    visits[b["index"]] += 1
    sums[b["index"]] += np.stack([b["label"], 2 * b["label"]], -1)
  for n_dev in (1, 8):
    out = _train(n_dev).example_state
    assert out["visits"].shape == (N, 1) and out["label_sum"].shape == (N, 2)  # flat rows
    np.testing.assert_array_equal(out["visits"][:, 0], visits)
    np.testing.assert_array_equal(out["label_sum"], sums)


def test_replicate_round_trip_keeps_rows_in_place():
  table = {"a": np.arange(N * 3, dtype=np.float32).reshape(N, 3)}
  state = ts.TrainState(step=0, apply_fn=None, params={}, tx=None, opt_state=(),
                        example_state=table, n_examples=N)
  r = parallel.replicate(state, 8)
  assert r.example_state["a"].shape == (8, 5, 3)  # ceil(37 / 8) = 5 rows per device
  np.testing.assert_array_equal(np.asarray(r.example_state["a"])[1, 0], table["a"][5])
  back = parallel.unreplicate(r)
  np.testing.assert_array_equal(back.example_state["a"], table["a"])
