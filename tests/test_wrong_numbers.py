"""No wrong number leaves the library silently.

- Robust accuracy counts only points classified correctly without attack (PGD as AutoAttack):
  shown on a model where the old rule (robust = correct at every restart's endpoint) counted
  points that were misclassified at x.
- NaN/Inf weights or logits stop every evaluation (Evaluator, final_evaluation, AutoAttack,
  `evaluate`) with NonFiniteOutputError, one line on the command line.
- Imports refuse non-finite tensors and negative BatchNorm variances; `--weights=best` on a run
  with no early-stopped weights yet is an error, not the initial weights.
"""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import MOCK_DATA_CLI, ROOT, tiny_config
from fastadv_jax import attacks, autoattack, losses, models, randomness
from fastadv_jax.data import datasets
from fastadv_jax.interop import torch_interop
from fastadv_jax.training import checkpointing, evaluation, monitoring, saved_run, workdir

SHAPE = (28, 28, 1)


class _Quantised(nn.Module):
  """A random linear model of the rounded input: its input gradient is zero, so PGD stays at its
  uniform random start, and a start can land on the right class where x itself is misclassified
  (the situation of a barely trained model, where PGD-5-1 reported 0.14 robust above 0.13 clean)."""
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train=False):
    del train
    q = jax.lax.stop_gradient(jnp.round((x - 0.5) * 16) / 16)
    return nn.Dense(self.num_classes)(q.reshape(q.shape[0], -1))


def _quantised_case(n=64):
  model = _Quantised()
  xu = np.asarray(jax.random.randint(jax.random.key(0), (n, 8, 8, 1), 0, 256), np.uint8)
  y = np.asarray(jax.random.randint(jax.random.key(1), (n,), 0, 2), np.int32)
  v = model.init(jax.random.key(2), xu[:1].astype(np.float32), train=False)
  return model, v, xu, y


def test_pgd_robust_accuracy_never_exceeds_clean_where_the_old_rule_did():
  model, v, xu, y = _quantised_case()
  eps, steps, restarts, rng = 0.5, 3, 2, jax.random.key(5)
  x = jnp.asarray(xu, jnp.float32) / 255
  keys = randomness.example_keys(rng, jnp.arange(len(y)))
  f = lambda z: (losses.cross_entropy(model.apply(v, z), y), model.apply(v, z))  # noqa: E731
  clean = np.asarray(attacks.clean_correct(f(x)[1], y))
  # The old rule: robust unless a restart's endpoint is misclassified (clean not consulted).
  old, _ = attacks.pgd_with_restarts(f, x, y, keys, eps, eps / 4, steps, restarts,
                                     clean=jnp.ones(len(y), bool))
  assert int(np.sum(np.asarray(old) & ~clean)) >= 1  # the violation this test guards against
  new, _ = attacks.pgd_with_restarts(f, x, y, keys, eps, eps / 4, steps, restarts)
  new = np.asarray(new)
  assert not np.any(new & ~clean)
  np.testing.assert_array_equal(new, np.asarray(old) & clean)
  ev = evaluation.Evaluator(model, batch_size=16)
  clean_acc = ev.clean_accuracy(v, xu, y)
  assert clean_acc == pytest.approx(float(np.mean(clean)))
  pgd_acc = ev.robust_accuracy(v, xu, y, eps, steps, restarts, rng)  # host-looped restarts
  assert pgd_acc == pytest.approx(float(np.mean(new))) and pgd_acc <= clean_acc
  d = ev.diagnostics(v, xu, y, eps, rng, steps)  # PGD-k-1 via pgd_with_restarts, and FGSM
  assert d["pgd_acc"] <= d["clean_acc"] and d["fgsm_acc"] <= d["clean_acc"]


def test_autoattack_robust_points_are_clean_points():
  model, v, xu, y = _quantised_case(32)
  res = autoattack.evaluate(lambda z: model.apply(v, z), xu.astype(np.float32) / 255, y, 0.5,
                            "apgd-ce", num_classes=2, progress=False, apgd_steps=2)
  assert not np.any(res.robust & ~res.clean) and res.accuracy <= res.clean_accuracy


def _bn_cnn(var=None, scale=1.0):
  """A small BatchNorm CNN, optionally with every running variance set to `var` and the params
  multiplied by `scale`."""
  model = models.SmallCNN(num_classes=10, width=4, use_batch_norm=True)
  v = jax.tree.map(np.asarray, model.init(jax.random.key(0), np.zeros((1, 12, 12, 1), np.float32),
                                          train=False))
  if var is not None:
    v["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda p, a: np.full_like(a, var) if "var" in jax.tree_util.keystr(p) else a,
        v["batch_stats"])
  v["params"] = jax.tree.map(lambda a: a * np.float32(scale), v["params"])
  xu = np.asarray(jax.random.randint(jax.random.key(1), (16, 12, 12, 1), 0, 256), np.uint8)
  y = np.asarray(jax.random.randint(jax.random.key(2), (16,), 0, 10), np.int32)
  return model, v, xu, y


@pytest.mark.parametrize("case", ["negative_variance", "huge_weights", "nan_weight"])
def test_non_finite_logits_or_weights_stop_every_evaluation(case):
  if case == "negative_variance":  # finite weights, NaN logits: the import
    model, v, xu, y = _bn_cnn(var=-2.0)
    match = "logits are NaN or Inf on 16 of 16"
  elif case == "huge_weights":  # finite weights whose activations overflow float32
    model, v, xu, y = _bn_cnn(scale=1e30)
    match = "logits are NaN or Inf"
  else:
    model, v, xu, y = _bn_cnn()
    v["params"]["fc"]["kernel"][0, 0] = np.nan
    match = r"weights are not finite: \['params'\]\['fc'\]\['kernel'\]"
  ev = evaluation.Evaluator(model, batch_size=16)
  with pytest.raises(evaluation.NonFiniteOutputError, match=match):
    ev.clean_accuracy(v, xu, y)
  with pytest.raises(evaluation.NonFiniteOutputError, match=match):
    ev.robust_accuracy(v, xu, y, 0.1, 1, 1, jax.random.key(0))
  with pytest.raises(evaluation.NonFiniteOutputError, match=match):
    ev.autoattack(v, xu, y, 0.1, "apgd-ce", progress=False)
  with pytest.raises(autoattack.NonFiniteOutputError, match="NaN or Inf"):
    autoattack.evaluate(lambda z: model.apply(v, z, train=False), xu.astype(np.float32) / 255,
                        y, 0.1, "apgd-ce", progress=False, apgd_steps=1)
  # The trainer's final evaluation (train._Run._final_evaluation calls this), PGD and AutoAttack.
  config = tiny_config(final_attack="pgd,autoattack", n_final_eval=16)
  with pytest.raises(evaluation.NonFiniteOutputError, match=match):
    evaluation.final_evaluation(config, ev, v, datasets.Split(xu, y), jax.random.key(0))
  assert issubclass(evaluation.NonFiniteOutputError, FloatingPointError)


def test_finite_models_pass_the_checks():
  model, v, xu, y = _bn_cnn()
  ev = evaluation.Evaluator(model, batch_size=16)
  assert 0.0 <= ev.clean_accuracy(v, xu, y) <= 1.0


SMALL_CNN = dict(model="small_cnn", n_filters=4)


def _state_dict(config, **changes):
  """The PyTorch state_dict of freshly initialised variables of `config`, with entries changed."""
  v = jax.tree.map(np.asarray, saved_run.variables_template(config))
  sd = torch_interop.to_torch_state_dict(config, v, SHAPE)
  for key, fn in changes.items():
    sd[key] = fn(sd[key])
  return v, sd


@pytest.mark.parametrize("key,fn,match", [
    ("bn1.running_var", lambda a: a - 2.0, r"'bn1.running_var'.*below zero"),
    ("conv0.weight", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a),
     r"'conv0.weight'\] holds 1 NaN or Inf"),
    ("fc.bias", lambda a: a.astype(np.float64) * 0 + 1e300, r"'fc.bias'.*NaN or Inf"),  # overflows
])
def test_import_refuses_non_finite_values_and_negative_variances(key, fn, match):
  config = tiny_config(**SMALL_CNN)
  v, sd = _state_dict(config, **{key: fn})
  with pytest.raises(torch_interop.InteropError, match=match):
    torch_interop.from_torch_state_dict(config, sd, v, SHAPE)


def test_best_weights_need_a_best_point(tmp_path):
  """A training checkpoint saved before the first diagnostics has no early-stopped weights (its
  RunRecord still has best_train_pgd -1); an import's weights are its best ones."""
  config = tiny_config(**SMALL_CNN)
  v, sd = _state_dict(config)
  np.savez(tmp_path / "sd.npz", **sd)
  torch_interop.import_to_workdir(config, str(tmp_path / "sd.npz"), str(tmp_path / "imported"))
  assert saved_run.load_run(str(tmp_path / "imported"), "best")[2] == 0
  _, _, step = saved_run.load_run(str(_killed_before_diagnostics(config, tmp_path / "killed")))
  assert step == 2
  with pytest.raises(checkpointing.CheckpointError, match="no early-stopped weights"):
    saved_run.load_run(str(tmp_path / "killed"), "best")


def _killed_before_diagnostics(config, wd):
  """A workdir as a run leaves it when killed after its checkpoint at iteration 2 and before its
  first diagnostics: the record's best point is still unset."""
  v = jax.tree.map(np.asarray, saved_run.variables_template(config))
  workdir.prepare(str(wd))
  ckpt = checkpointing.Checkpointer(str(wd))
  try:
    ckpt.save(2, v, v, monitoring.RunRecord(train_time_s=1.0).to_json())
  finally:
    ckpt.close()
  workdir.record_config(config, str(wd))
  return wd


# The real command lines, in subprocesses on mock data (as tests/test_reliability.py runs them).
def _cli(module, *args, timeout=180):
  return subprocess.run([sys.executable, "-c", MOCK_DATA_CLI, module, *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=timeout,
                        env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))


def _assert_error_line(proc, *needles):
  """Exit 2, no traceback, and the last line of stderr is the error. (Another change removes
  TensorFlow/absl start-up noise from stderr; once it lands, the error is exactly one line.)"""
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
  assert lines and lines[-1].startswith("error:"), proc.stderr[-2000:]
  for needle in needles:
    assert needle in lines[-1], lines[-1]


def test_command_lines_refuse_wrong_numbers(tmp_path):
  config = tiny_config(**SMALL_CNN)
  # An import with a negative BatchNorm variance (NaN logits) is refused, naming the tensor.
  _, sd = _state_dict(config, **{"bn1.running_var": lambda a: a - 2.0})
  np.savez(tmp_path / "negative_var.npz", **sd)
  proc = _cli("fastadv_jax.torch_import", f"--state_dict={tmp_path / 'negative_var.npz'}",
              f"--config={ROOT}/configs/default.py", f"--workdir={tmp_path / 'refused'}",
              "--config.model=small_cnn", "--config.model_args.small_cnn.n_filters=4")
  _assert_error_line(proc, "bn1.running_var", "below zero")
  assert not (tmp_path / "refused" / "checkpoints").exists()

  # Finite weights so large that the logits overflow: evaluate stops at the clean pass.
  _, sd = _state_dict(config, **{k: (lambda a: a * np.float32(1e30))
                                 for k in ("conv0.weight", "conv1.weight", "fc.weight")})
  np.savez(tmp_path / "huge.npz", **sd)
  torch_interop.import_to_workdir(config, str(tmp_path / "huge.npz"), str(tmp_path / "huge"))
  proc = _cli("fastadv_jax.evaluate", f"--workdir={tmp_path / 'huge'}", "--attack=pgd,autoattack",
              "--n_eval=8", "--pgd_steps=1", "--pgd_restarts=1")
  _assert_error_line(proc, "logits are NaN or Inf")
  assert not any(p.name.startswith("eval_") for p in (tmp_path / "huge").iterdir())

  # --weights=best on a run killed before its first diagnostics.
  wd = _killed_before_diagnostics(config, tmp_path / "killed")
  proc = _cli("fastadv_jax.evaluate", f"--workdir={wd}", "--weights=best", "--n_eval=8",
              "--pgd_steps=1", "--pgd_restarts=1")
  _assert_error_line(proc, "--weights=best", "no early-stopped weights")
