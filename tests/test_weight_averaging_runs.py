"""Weight averaging, the validation split and validation selection, end to end: the average on
N devices == 1 device and follows its recursion; it is checkpointed and resumed exactly; the
diagnostics, results.json, `evaluate` and `torch_export` see the averaged and selected weights;
the default run gains no key."""
import json
import types

import jax
import numpy as np
import pytest

from conftest import tiny_config
from fastadv_jax.data import datasets
from fastadv_jax.interop import torch_interop
from fastadv_jax.training import (checkpointing, config_validation, metric_writers, model_config,
                                  monitoring, saved_run, train, weight_averaging, workdir)
from fastadv_jax.training import train_state as ts
from test_reliability import _Killed, _cli, _raise_in, _results
from test_train_step import N_DEV, _max_rel_err, _run

# 48 mock examples - 16 held out = 32 to train on: 2 iterations per epoch, 6 in all;
# diagnostics every epoch (2, 4, 6), checkpoints at 3 and 6 (3 is mid-epoch). FGSM-PGI with
# label smoothing: its per-example buffers are checkpointed and resumed beside the average.
RUN = dict(ema_decay=0.5, validation_size=16, selection="validation", num_epochs=3,
           eval_every=2, log_every=1, checkpoint_every=3, method="fgsm_pgi", label_smoothing=0.4,
           grad_align_lambda=0.0, method_args={"fgsm_pgi": {"reset_every": 2}})


@pytest.mark.parametrize("tau,warmup", [(0.9, False), (0.95, True)])
def test_the_average_follows_its_recursion_on_1_and_8_devices(tau, warmup):
  """ema_1 = theta_1; ema_t = tau_t ema_{t-1} + (1 - tau_t) theta_t, tau_t = tau or, with the
  warm-up, min(tau, (1 + t) / (10 + t)) (t 0-based), for the parameters and BN statistics."""
  c = tiny_config(method="fgsm", ema_decay=tau, ema_warmup=warmup, lr_schedule="constant",
                  lr_max=0.05)
  states = [_run(c, 1, steps=k)[0] for k in (1, 2, 3)]
  expected = None
  for t, s in enumerate(states):
    theta = {"params": s.params, "batch_stats": s.batch_stats}
    tau_t = 0.0 if t == 0 else (min(tau, (1 + t) / (10 + t)) if warmup else tau)
    expected = theta if expected is None else jax.tree.map(
        lambda e, v, a=tau_t: a * np.asarray(e, np.float64) + (1 - a) * np.asarray(v, np.float64),
        expected, theta)
  one = states[-1]
  assert _max_rel_err(one.ema, expected) < 1e-6
  assert _max_rel_err(one.ema["params"], one.params) > 1e-3  # an average, not the last weights
  many, _, _ = _run(c, N_DEV, steps=3)
  assert _max_rel_err(one.ema, many.ema) < 1e-5


def test_the_selection_rule():
  """Higher validation PGD of raw / averaged (tie: raw); kept if it beats the best PGD so far
  (tie: higher clean accuracy)."""
  def diag(raw, avg):
    return {"val": dict(zip(("pgd_acc", "clean_acc"), raw)),
            "val_avg": dict(zip(("pgd_acc", "clean_acc"), avg))}

  m = types.SimpleNamespace(record=monitoring.RunRecord(), best=None)
  select = lambda step, d: monitoring.Monitor._select(m, step, "RAW", "AVG", d)  # noqa: E731
  select(2, diag((0.3, 0.5), (0.3, 0.9)))  # tie on PGD: raw, although averaged is cleaner
  assert (m.record.selected, m.best, m.record.best_step) == ("raw", "RAW", 2)
  select(4, diag((0.2, 0.9), (0.4, 0.6)))  # averaged is more robust and beats 0.3
  assert (m.record.selected, m.best, m.record.best_step) == ("averaged", "AVG", 4)
  assert (m.record.best_val_pgd, m.record.best_val_clean) == (0.4, 0.6)
  select(6, diag((0.4, 0.6), (0.1, 0.1)))  # ties the best PGD, not its clean accuracy: kept
  assert m.record.best_step == 4
  select(8, diag((0.4, 0.7), (0.1, 0.1)))  # ties the best PGD with a higher clean accuracy
  assert (m.record.selected, m.record.best_step) == ("raw", 8)
  select(10, diag((0.35, 1.0), (0.39, 1.0)))  # below the best: nothing changes
  assert (m.record.selected, m.record.best_step, m.best) == ("raw", 8, "RAW")
  m = types.SimpleNamespace(record=monitoring.RunRecord(), best=None)
  monitoring.Monitor._select(m, 2, "RAW", None, {"val": {"pgd_acc": 0.0, "clean_acc": 0.0}})
  assert (m.record.selected, m.best) == ("raw", "RAW")  # without averaging: raw alone


def test_the_validation_split_is_the_end_of_the_training_set():
  split = datasets.Split(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1),
                         np.arange(10, dtype=np.int32))
  train_part, val = datasets.hold_out(split, 3)
  assert train_part.labels.tolist() == list(range(7)) and val.labels.tolist() == [7, 8, 9]
  assert datasets.hold_out(split, 0) == (split, None)
  with pytest.raises(config_validation.ConfigError, match="config.selection: 'validation'"):
    config_validation.validate_config(tiny_config(selection="validation"))
  with pytest.raises(config_validation.ConfigError, match="config.selection: unknown"):
    config_validation.validate_config(tiny_config(selection="best"))


def test_too_large_a_validation_split_is_a_config_error(tmp_path, mock_fashion_mnist):
  with pytest.raises(config_validation.ConfigError, match="config.batch_size: 16 .*40 held out"):
    train.train_and_evaluate(tiny_config(validation_size=40), str(tmp_path / "a"))
  with pytest.raises(config_validation.ConfigError, match="config.validation_size: 48 leaves"):
    train.train_and_evaluate(tiny_config(validation_size=48), str(tmp_path / "b"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  import tensorflow_datasets as tfds
  wd = tmp_path_factory.mktemp("averaged_reference")
  with tfds.testing.mock_data(num_examples=48):
    results = train.train_and_evaluate(tiny_config(**RUN), str(wd))
  return wd, results


def _rows(wd):
  return metric_writers.read_metrics(str(wd))


def test_diagnostics_results_and_selection_of_a_run(reference):
  wd, results = reference
  assert results["iterations"] == 6  # 32 training examples left, batch 16, 3 epochs
  diag = [r for r in _rows(wd) if "eval_eps" in r]
  assert [r["step"] for r in diag] == [2, 4, 6]
  for r in diag:  # validation selection: no test point is looked at during training
    assert not any(k.startswith("test_") for k in r)
    for k in ("clean_acc", "fgsm_acc", "pgd_acc", "loss", "alignment"):
      assert {f"val_{k}", f"val_{k}_avg", f"train_eval_{k}", f"train_eval_{k}_avg"} <= r.keys()
  # The selection recomputed from the rows: the rule on (val PGD, val clean) of both weights.
  best, chosen = (-1.0, -1.0), None
  for r in diag:
    cand = ("raw", r["val_pgd_acc"], r["val_clean_acc"])
    if r["val_pgd_acc_avg"] > r["val_pgd_acc"]:
      cand = ("averaged", r["val_pgd_acc_avg"], r["val_clean_acc_avg"])
    if cand[1:] > best:
      best, chosen = cand[1:], (cand[0], r["step"])
  sel = results["selected"]
  assert (sel["weights"], sel["iteration"]) == chosen
  assert (sel["val_pgd_acc"], sel["val_clean_acc"]) == best
  assert {"clean_acc", "pgd_acc"} <= sel.keys() and "best" not in results
  assert results["averaged"]["iteration"] == 6 and {"clean_acc", "pgd_acc"} <= results[
      "averaged"].keys()
  # evaluate's weights: the averaged ones are the checkpointed train state's average; the
  # selected ones are the checkpoint's kept weights, at the selected iteration.
  config = workdir.read_config(str(wd))
  _, averaged, step = saved_run.load_run(str(wd), "averaged")
  model = model_config.create_model(config, 10, half_precision=False)
  template = ts.create_train_state(config, model, jax.random.key(1), (28, 28, 1), 2,
                                   n_examples=32)
  ckpt = checkpointing.Checkpointer(str(wd), read_only=True)
  try:
    state, _, _ = ckpt.restore(6, template, ts.variables(template))
  finally:
    ckpt.close()
  assert step == 6 and set(state.ema) == {"params", "batch_stats"}
  want = weight_averaging.variables(state.ema, ts.variables(state))
  for a, b in zip(jax.tree.leaves(averaged), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert _max_rel_err(averaged["params"], state.params) > 1e-4
  _, selected, sel_step = saved_run.load_run(str(wd), "selected")
  assert sel_step == sel["iteration"]
  # the wrong kind of kept weights is one CheckpointError naming the right flag
  with pytest.raises(checkpointing.CheckpointError, match="use --weights=selected"):
    saved_run.load_run(str(wd), "best")


def test_export_of_the_averaged_weights(reference, tmp_path):
  """The command line, in a subprocess (its flags and evaluate's cannot share a process)."""
  wd, _ = reference
  proc = _cli(["fastadv_jax.torch_export", f"--workdir={wd}", f"--out={tmp_path / 'out'}",
               "--weights=averaged"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = dict(np.load(tmp_path / "out" / "state_dict.npz"))
  config, averaged, _ = saved_run.load_run(str(wd), "averaged")
  _, last, _ = saved_run.load_run(str(wd), "last")
  want = torch_interop.to_torch_state_dict(config, averaged, (28, 28, 1))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert any(not np.array_equal(got[k], v)
             for k, v in torch_interop.to_torch_state_dict(config, last, (28, 28, 1)).items())
  assert json.loads((tmp_path / "out" / "spec.json").read_text())["weights"] == "averaged"


@pytest.mark.parametrize("where,exc", [("step", _Killed), ("diagnostics", KeyboardInterrupt)])
def test_killed_mid_epoch_then_resumed_equals_uninterrupted(where, exc, reference, tmp_path,
                                                            mock_fashion_mnist):
  """Killed in iteration 5 (after the mid-epoch checkpoint at 3: iteration 4 and its
  diagnostics are redone), or interrupted inside the diagnostics of iteration 4."""
  ref_wd, _ = reference
  config = tiny_config(**RUN)
  obj, name, when = {
      "step": (train._Run, "step", lambda self, step: step == 4),
      "diagnostics": (monitoring.Monitor, "run", lambda self, step, *v: step == 4)}[where]
  with _raise_in(obj, name, exc, when) as fired, pytest.raises(exc):
    train.train_and_evaluate(config, str(tmp_path))
  assert fired and not (tmp_path / "results.json").exists()
  assert checkpointing.Checkpointer(str(tmp_path)).latest_step() in (3, 4)
  train.train_and_evaluate(config, str(tmp_path))
  got, want = _results(tmp_path), _results(ref_wd)
  got.pop("step_time_s"), want.pop("step_time_s")
  assert got == want
  assert _rows(tmp_path) == _rows(ref_wd)


def test_default_run_gains_no_key_and_a_checkpoint_without_an_average_is_refused(
    tmp_path, mock_fashion_mnist):
  results = train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  assert not {"averaged", "selected"} & results.keys() and "best" in results
  for r in _rows(tmp_path):
    assert not any(k.endswith("_avg") or k.startswith("val_") for k in r), r
  with pytest.raises(checkpointing.CheckpointError, match="no weight average"):
    saved_run.load_run(str(tmp_path), "averaged")
  with pytest.raises(checkpointing.CheckpointError, match="use --weights=best|its early-stopped"):
    saved_run.load_run(str(tmp_path), "selected")
  # Resumed with averaging on (config.json gone, so the checkpoint's structure is the check):
  # refused as another config, not restarted from a fresh average, and not moved aside.
  (tmp_path / "config.json").unlink()
  (tmp_path / "results.json").unlink()
  with pytest.raises(checkpointing.CheckpointError, match=r"does not fit this config.*'ema'"):
    train.train_and_evaluate(tiny_config(num_epochs=1, ema_decay=0.5), str(tmp_path))
  assert not (tmp_path / "corrupt_checkpoints").exists()
  assert checkpointing.Checkpointer(str(tmp_path)).latest_step() == 3


def test_an_old_config_json_without_the_new_fields_reads_as_their_defaults(tmp_path):
  old = workdir.config_dict(tiny_config())
  for field in ("validation_size", "selection", "ema_decay", "ema_warmup", "ema_batch_stats"):
    old.pop(field, None)
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # a run with something to resume
  assert workdir.check_rerun(tiny_config(), str(tmp_path)) is None
  with pytest.raises(workdir.RunChangedError, match="validation_size 0 -> 16"):
    workdir.check_rerun(tiny_config(validation_size=16, selection="validation"), str(tmp_path))
  with pytest.raises(workdir.RunChangedError, match="ema_decay 0.0 -> 0.5"):
    workdir.check_rerun(tiny_config(ema_decay=0.5), str(tmp_path))


def test_evaluate_reads_the_averaged_and_the_selected_weights(reference, capsys,
                                                              mock_fashion_mnist):
  """The same weights and points as the final evaluation's blocks: the same clean accuracy."""
  from test_train import _evaluate
  wd, results = reference
  capsys.readouterr()  # what building the module's run printed
  for weights, block in (("averaged", "averaged"), ("selected", "selected")):
    out = _evaluate([f"--workdir={wd}", f"--weights={weights}", "--n_eval=16", "--pgd_steps=2",
                     "--pgd_restarts=1"], capsys)
    assert out["weights"] == weights and out["iteration"] == results[block]["iteration"]
    assert out["clean_acc"] == results[block]["clean_acc"]
    assert (wd / f"eval_{weights}_eps0.1000_n16_pgd2x1.json").exists()
