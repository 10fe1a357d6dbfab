"""train_and_evaluate end to end on mock data: outputs, resume, bad checkpoints, NaN."""
import contextlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from conftest import tiny_config
from fastadv_jax.data import datasets
from fastadv_jax.evaluate import load_run
from fastadv_jax.training import (checkpointing, config_validation, metric_writers, monitoring,
                                  preemption, train, train_metrics)


def _final_params(workdir):
  _, variables, step = load_run(str(workdir))
  return variables, step


def test_run_writes_metrics_events_checkpoint_and_results(tmp_path, mock_fashion_mnist):
  results = train.train_and_evaluate(tiny_config(), str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["clean_acc"] == results["clean_acc"]
  for key in ("clean_acc", "pgd_acc", "n_eval", "config", "wall_time_s", "eps", "pgd_steps",
              "pgd_restarts", "best", "catastrophic_overfitting"):
    assert key in saved, key
  assert saved["n_eval"] == 16 and saved["pgd_steps"] == 3 and saved["pgd_restarts"] == 2
  assert 0.0 <= saved["pgd_acc"] <= saved["clean_acc"] <= 1.0
  assert saved["config"]["method"] == "fgsm"
  records = metric_writers.read_metrics(str(tmp_path))
  assert all("step" in r and "epoch" in r for r in records)
  train_recs = [r for r in records if "train_loss" in r]
  eval_recs = [r for r in records if "test_alignment" in r]
  assert [r["step"] for r in train_recs] == [2, 4, 6]
  assert [r["step"] for r in eval_recs] == [4, 6]  # 3 iterations/epoch x 2 epochs
  for r in eval_recs:
    assert -1.0 <= r["test_alignment"] <= 1.0 and -1.0 <= r["test_cos_fgsm_pgd"] <= 1.0
    assert {"test_clean_acc", "test_fgsm_acc", "test_pgd_acc", "train_eval_pgd_acc",
            "train_eval_reg"} <= r.keys()
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
  assert checkpointing.Checkpointer(str(tmp_path)).latest_step() == 6


class _Killed(Exception):
  """Stands for SIGKILL: not a KeyboardInterrupt, so nothing is saved on the way out."""


@contextlib.contextmanager
def _killed_at_batch(b):
  original = datasets.TrainBatches.get
  calls = []

  def get(self, i):
    calls.append(i)
    if i == b and calls.count(b) == 2:  # the second replay of minibatch b
      raise _Killed
    return original(self, i)

  datasets.TrainBatches.get = get
  try:
    yield
  finally:
    datasets.TrainBatches.get = original


def test_interrupted_run_resumes_to_identical_results(tmp_path, mock_fashion_mnist):
  config = tiny_config(method="free", grad_align_lambda=0.3, method_args={"free": {"replay": 2}})
  full = tmp_path / "full"
  interrupted = tmp_path / "interrupted"
  r_full = train.train_and_evaluate(config, str(full))
  # Killed (no chance to save) while iteration 6 fetches its minibatch: the checkpoint of
  # iteration 4 survives, 5 is lost and replayed.
  with _killed_at_batch(2), pytest.raises(_Killed):  # replay=2: batch 2 = iteration 5, 6
    train.train_and_evaluate(config, str(interrupted))
  assert checkpointing.Checkpointer(str(interrupted)).latest_step() == 4
  r_resumed = train.train_and_evaluate(config, str(interrupted))
  for key in ("clean_acc", "pgd_acc"):
    assert r_resumed[key] == r_full[key]
  assert r_resumed["best"] == r_full["best"]
  (v_full, s_full), (v_res, s_res) = _final_params(full), _final_params(interrupted)
  assert s_full == s_res == 6
  for a, b in zip(jax.tree.leaves(v_full), jax.tree.leaves(v_res)):
    np.testing.assert_array_equal(a, b)
  steps = [r["step"] for r in metric_writers.read_metrics(str(interrupted)) if "train_loss" in r]
  assert steps == [2, 4, 6]  # no record logged twice


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, mock_fashion_mnist):
  config = tiny_config(num_epochs=1)
  train.train_and_evaluate(config, str(tmp_path))
  ckpt_dir = pathlib.Path(tmp_path) / "checkpoints" / "3" / "state"
  files = [p for p in ckpt_dir.rglob("*") if p.is_file()]
  assert files
  for p in files:
    p.write_bytes(b"\x00garbage")
  (tmp_path / "results.json").unlink()  # a finished run reads no checkpoint: one killed late
  with pytest.raises(checkpointing.CheckpointError, match="could not be restored") as err:
    train.train_and_evaluate(config, str(tmp_path))
  assert str(ckpt_dir.parent) in str(err.value) and "--workdir" in str(err.value)
  assert "edited" not in str(err.value)  # damage, not another config: no mismatch advice


def test_incompatible_config_gives_a_clear_error(tmp_path, mock_fashion_mnist):
  train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  # Without config.json (and results.json), which refuse the change first (workdir.check_rerun,
  # tests/test_immutable_runs.py), the checkpoint's structure is what refuses it.
  (tmp_path / "config.json").unlink()
  (tmp_path / "results.json").unlink()
  with pytest.raises(checkpointing.CheckpointError, match="does not fit this config") as err:
    train.train_and_evaluate(tiny_config(num_epochs=1, n_filters=8), str(tmp_path))
  # the checkpoint says what it was written with, and what resumes it; nothing advises deleting
  assert "it was written with model_args.small_cnn.n_filters=4 (now 8)" in str(err.value)
  assert "--config.model_args.small_cnn.n_filters=4" in str(err.value)
  assert "delete" not in str(err.value)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, mock_fashion_mnist):
  config = tiny_config(lr_max=1e30, lr_schedule="constant", log_every=1, checkpoint_every=1,
                       grad_align_lambda=0.0)
  with pytest.raises(train_metrics.NonFiniteError,
                     match="non-finite loss or gradient at iteration"):
    train.train_and_evaluate(config, str(tmp_path))
  # Iteration 1's loss is finite (its update is what explodes), so it was checkpointed; the
  # first non-finite iteration never is.
  step = checkpointing.Checkpointer(str(tmp_path)).latest_step()
  assert step is not None and step >= 1
  _, variables, _ = load_run(str(tmp_path))
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(variables))


def _evaluate(args, capsys):
  """fastadv_jax.evaluate's main on these flags, in this process; its printed JSON."""
  from absl import flags
  from fastadv_jax import evaluate
  argv = ["evaluate"] + args
  flags.FLAGS.unparse_flags()
  flags.FLAGS(argv)
  try:
    evaluate.main(argv)
  finally:
    flags.FLAGS.unparse_flags()
  return json.loads(capsys.readouterr().out)


def test_evaluate_command_on_a_finished_run(tmp_path, mock_fashion_mnist, capsys):
  results = train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  out = _evaluate(["--workdir=" + str(tmp_path), "--weights=last", "--n_eval=16",
                   "--pgd_steps=3", "--pgd_restarts=2"], capsys)
  assert out["clean_acc"] == results["clean_acc"]  # the same weights, the same points
  assert out["iteration"] == 3 and out["n_eval"] == 16 and out["eps"] == pytest.approx(0.1)
  assert 0.0 <= out["pgd_acc"] <= out["clean_acc"]
  assert (tmp_path / "eval_last_eps0.1000_n16_pgd3x2.json").exists()


def test_catastrophic_overfitting_is_flagged_once_at_the_collapse():
  config = tiny_config()
  meta = monitoring.RunRecord()
  series = [(200, 0.30, 0.95), (400, 0.35, 0.96), (600, 0.30, 0.90),  # healthy
            (800, 0.15, 0.90),   # PGD drops but alignment holds: not the signature
            (1000, 0.02, 0.10),  # collapse with alignment falling
            (1200, 0.01, 0.05)]
  flags_ = [monitoring.track_catastrophic_overfitting(meta, config, s, p, a) for s, p, a in series]
  assert flags_ == [False, False, False, False, True, False]
  assert meta.co_step == 1000 and meta.best_test_pgd == 0.35
  calm = monitoring.RunRecord()
  assert not any(monitoring.track_catastrophic_overfitting(calm, config, s, p, 0.9)
                 for s, p in ((1, 0.05), (2, 0.01)))  # never robust: nothing to collapse from


def test_ctrl_c_saves_a_checkpoint_and_loses_nothing(tmp_path, mock_fashion_mnist, monkeypatch):
  config = tiny_config(checkpoint_every=100)  # no periodic checkpoint before the interruption
  r_full = train.train_and_evaluate(config, str(tmp_path / "full"))
  original = datasets.TrainBatches.get

  def interrupted_get(self, b):
    if b == 5:
      raise KeyboardInterrupt  # what SIGTERM is turned into, too
    return original(self, b)

  monkeypatch.setattr(datasets.TrainBatches, "get", interrupted_get)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "cut"))
  assert checkpointing.Checkpointer(str(tmp_path / "cut")).latest_step() == 5
  monkeypatch.setattr(datasets.TrainBatches, "get", original)
  r_cut = train.train_and_evaluate(config, str(tmp_path / "cut"))
  assert (r_cut["clean_acc"], r_cut["pgd_acc"]) == (r_full["clean_acc"], r_full["pgd_acc"])
  with pytest.raises(KeyboardInterrupt):
    preemption.raise_keyboard_interrupt(15, None)  # the SIGTERM handler


def test_diagnostics_use_the_full_eps_during_warmup(tmp_path, mock_fashion_mnist):
  train.train_and_evaluate(tiny_config(eps_warmup_epochs=2.0, eval_every=2), str(tmp_path))
  records = metric_writers.read_metrics(str(tmp_path))
  train_eps = [r["eps"] for r in records if "eps" in r]
  assert train_eps[0] < 0.1 * 0.5  # still warming up at the first log
  assert [r["eval_eps"] for r in records if "eval_eps" in r] == pytest.approx([0.1] * 3)


def test_autoattack_at_the_end_of_a_run_and_from_the_evaluate_command(tmp_path,
                                                                       mock_fashion_mnist, capsys):
  results = train.train_and_evaluate(tiny_config(num_epochs=1, final_attack="apgd-ce,square"),
                                     str(tmp_path))
  assert "pgd_acc" not in results  # AutoAttack instead of PGD
  assert list(results["autoattack_robust_counts"]) == ["apgd-ce", "square"]
  assert results["autoattack_acc"] <= results["clean_acc"]
  assert "autoattack_acc" in results["best"] and "pgd_acc" not in results["best"]
  with pytest.raises(config_validation.ConfigError, match="config.final_attack: unknown attack"):
    config_validation.validate_config(tiny_config(final_attack="pgd,cw"))
  out = _evaluate([f"--workdir={tmp_path}", "--n_eval=16", "--pgd_steps=3", "--pgd_restarts=2",
                   "--attack=pgd,autoattack"], capsys)
  counts = list(out["autoattack_robust_counts"].values())
  assert list(out["autoattack_robust_counts"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert counts == sorted(counts, reverse=True)  # each attack only removes robust points
  assert out["autoattack_acc"] == counts[-1] / 16 <= out["clean_acc"]
  assert out["autoattack_clean_acc"] == out["clean_acc"] == results["clean_acc"]
  assert "pgd_acc" in out
  assert (tmp_path / "eval_last_eps0.1000_n16_pgd3x2+aa-standard.json").exists()


def test_the_final_pgd_shows_its_progress_and_the_same_verdicts(capsys):
  """Evaluator.robust_points(progress=True), as the final evaluation and `evaluate` call it: a
  bar of points done and robust so far, on stderr; the verdicts are those without the bar."""
  from fastadv_jax import models  # pylint: disable=import-outside-toplevel
  from fastadv_jax.training import evaluation
  model = models.SmallCNN(num_classes=10, width=4, use_batch_norm=True)
  v = model.init(jax.random.key(0), np.zeros((1, 12, 12, 1), np.float32), train=False)
  x = np.asarray(jax.random.randint(jax.random.key(1), (40, 12, 12, 1), 0, 256), np.uint8)
  y = np.asarray(jax.random.randint(jax.random.key(2), (40,), 0, 10), np.int32)
  ev = evaluation.Evaluator(model, batch_size=16)
  quiet = ev.robust_points(v, x, y, 0.1, 2, 2, jax.random.key(3))
  assert capsys.readouterr().err == ""
  shown = ev.robust_points(v, x, y, 0.1, 2, 2, jax.random.key(3), progress=True)
  np.testing.assert_array_equal(shown, quiet)
  err = capsys.readouterr().err
  assert "PGD-2-2" in err and "restart 2/2" in err and f"of {len(y)}" in err, err
  assert f"robust {np.mean(quiet):.3f} of 40" in err
