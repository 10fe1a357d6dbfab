"""Recorded runs do not change, and every check runs before any work (docs/reliability.md).

Through the command line, as users run it: `python -m fastadv_jax.main` on TFDS mock data in a
subprocess (conftest.MOCK_DATA_CLI, TINY_CLI). One finished tiny run is made once per module;
every refused rerun must stop before loading data, with one line, exit 2, and no file of the
workdir changed (bytes and modification times of every file compared).
"""
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import pytest

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI, tiny_config
from fastadv_jax.training import config_validation, workdir


def _main(wd: pathlib.Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """`fastadv_jax.main --config=configs/default.py <TINY_CLI> --workdir=wd <args>` on mock data,
  on one CPU device."""
  argv = [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
          f"--config={ROOT}/configs/default.py", f"--workdir={wd}", *TINY_CLI, *args]
  return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                        env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))


def _files(wd: pathlib.Path) -> dict[str, tuple[str, int]]:
  """Every file under wd (the lock file too): its SHA-256 and modification time."""
  return {str(p.relative_to(wd)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
          for p in sorted(wd.rglob("*")) if p.is_file()}


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """Exit 2 and, on stdout and stderr together, exactly one line: `error: ...` naming
  `needles`. (This relies on the command lines' quiet start-up, cli_logging.quiet_startup,
  which MOCK_DATA_CLI applies too: without it TensorFlow and absl print lines of their own
  first, and only the last line could be checked.)"""
  out = proc.stderr + proc.stdout
  assert proc.returncode == 2, out[-3000:]
  lines = out.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> pathlib.Path:
  """A finished tiny run (3 iterations of fgsm + GradAlign, results.json written); tests that
  would change it work on a copy."""
  wd = tmp_path_factory.mktemp("finished") / "run"
  proc = _main(wd)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (wd / "results.json").is_file()
  return wd


@pytest.fixture
def unfinished(finished, tmp_path) -> pathlib.Path:
  """A copy of the finished run without results.json: a run killed in its final evaluation
  (checkpoint at the last iteration, config.json and metrics.jsonl written)."""
  wd = tmp_path / "run"
  shutil.copytree(finished, wd)
  (wd / "results.json").unlink()
  return wd


def test_a_finished_run_refuses_another_eps_and_method(finished):
  before = _files(finished)
  line = _assert_one_line_error(_main(finished, "--config.eps=0.2", "--config.method=pgd"),
                                "eps 0.1 -> 0.2", 'method "fgsm" -> "pgd"', "new --workdir")
  assert "method_args" not in line  # pgd's own args are at their defaults: not named
  assert _files(finished) == before  # results.json and config.json byte-identical, untouched


def test_a_changed_method_hyperparameter_is_refused(finished):
  before = _files(finished)
  _assert_one_line_error(_main(finished, "--config.method_args.fgsm.alpha=1.0"),
                         "method_args.fgsm.alpha 1.25 -> 1.0")
  assert _files(finished) == before


def test_a_finished_run_refuses_another_final_evaluation_and_names_evaluate(finished):
  before = _files(finished)
  _assert_one_line_error(_main(finished, "--config.final_pgd_steps=5"), "final_pgd_steps",
                         "python -m fastadv_jax.evaluate", "--pgd_steps=5")
  assert _files(finished) == before


def test_rerunning_a_finished_run_writes_nothing(finished):
  """The same command, or one that changes only fields a rerun may change (and another
  method's hyperparameters, which this run never reads: a warning): exit 0, the recorded
  results."""
  before = _files(finished)
  for extra in ([], ["--config.data_dir=/elsewhere-use-mock", "--config.progress_bar=True",
                     "--config.keep_checkpoints=5", "--config.method_args.pgd.steps=3"]):
    proc = _main(finished, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "holds a finished run" in proc.stderr
    assert _files(finished) == before


def test_an_unfinished_run_refuses_a_metrics_field_and_resumes_with_safe_ones(unfinished):
  wd = unfinished
  before = _files(wd)
  _assert_one_line_error(_main(wd, "--config.eval_every=1"), "eval_every 200 -> 1")
  assert _files(wd) == before
  metrics = (wd / "metrics.jsonl").read_text()
  proc = _main(wd, "--config.data_dir=/elsewhere-use-mock", "--config.keep_checkpoints=3",
               "--config.checkpoint_every=7", "--config.n_final_eval=8",
               "--config.final_pgd_restarts=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((wd / "results.json").read_text())
  assert (results["n_eval"], results["pgd_restarts"]) == (8, 2)
  config = json.loads((wd / "config.json").read_text())
  assert (config["data_dir"], config["keep_checkpoints"], config["n_final_eval"]) == (
      "/elsewhere-use-mock", 3, 8)  # the new values are recorded
  assert (wd / "metrics.jsonl").read_text() == metrics  # no training row changed


def test_autoattack_at_eps_0_is_refused_before_any_work(tmp_path):
  wd = tmp_path / "wd"
  _assert_one_line_error(_main(wd, "--config.final_attack=autoattack", "--config.eps=0"),
                         "config.final_attack", "eps > 0")
  assert not wd.exists()


@pytest.mark.parametrize("blocked", ["results.json", "config.json", "metrics.jsonl"])
def test_a_file_path_taken_by_a_folder_is_refused_before_training(blocked, tmp_path):
  wd = tmp_path / "wd"
  (wd / blocked).mkdir(parents=True)
  (wd / blocked / "keep").write_text("x")
  before = _files(wd)
  _assert_one_line_error(_main(wd), str(wd / blocked), "is not a file")
  assert _files(wd) == before
  assert sorted(p.name for p in wd.iterdir()) == [blocked]  # no lock, checkpoint or metrics


def test_a_read_only_metrics_file_is_refused_before_training(unfinished):
  path = unfinished / "metrics.jsonl"
  as_root = os.geteuid() == 0 and shutil.which("chattr")
  if as_root:  # chmod does not stop root; the immutable attribute does
    subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True)
  else:
    path.chmod(0o444)
  try:
    if os.access(path, os.W_OK):
      pytest.skip("cannot make a read-only file here")
    before = _files(unfinished)
    _assert_one_line_error(_main(unfinished), str(path), "read-only")
    assert _files(unfinished) == before
  finally:
    if as_root:
      subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
    else:
      path.chmod(0o644)


# In-process: how a recorded config is compared (no subprocess, no training).
def _record(wd: pathlib.Path, stored: dict) -> None:
  wd.mkdir(exist_ok=True)
  (wd / "config.json").write_text(json.dumps(stored))


def test_an_old_config_json_is_compared_after_migration(tmp_path):
  """A config.json from before method_args: its fgsm_alpha is method_args.fgsm.alpha; a field it
  lacks (added to the library since) is compared as its default."""
  old = workdir.config_dict(tiny_config())
  alpha = old.pop("method_args")["fgsm"]["alpha"]
  old.update(fgsm_alpha=alpha, pgd_steps=7)  # pgd_steps: a moved field of another method
  del old["grad_align_derivative"]
  _record(tmp_path, old)
  (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # a run with something to resume
  assert config_validation.migrate_stored_config(old)["method_args"] == {"fgsm": {"alpha": alpha}}
  assert workdir.check_rerun(tiny_config(), str(tmp_path)) is None
  with pytest.raises(workdir.RunChangedError, match=r"method_args\.fgsm\.alpha 1\.25 -> 1\.0"):
    workdir.check_rerun(tiny_config(method_args={"fgsm": {"alpha": 1.0}}), str(tmp_path))
  with pytest.raises(workdir.RunChangedError, match=r"grad_align_derivative \"auto\" -> \"jvp\""):
    workdir.check_rerun(tiny_config(grad_align_derivative="jvp"), str(tmp_path))


def test_a_recorded_config_without_a_checkpoint_is_replaced_not_refused(tmp_path):
  """A run that failed or stopped before its first checkpoint has nothing to resume: another
  config may run there (a checkpoint being written, Orbax's temporary folder, is none)."""
  _record(tmp_path, workdir.config_dict(tiny_config()))
  (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
  assert workdir.check_rerun(tiny_config(seed=1, eps=0.2), str(tmp_path)) is None
  (tmp_path / "checkpoints" / "4").mkdir()
  with pytest.raises(workdir.RunChangedError, match=r"another config \(eps 0\.1 -> 0\.2"):
    workdir.check_rerun(tiny_config(seed=1, eps=0.2), str(tmp_path))


def test_the_resume_safe_fields_are_config_fields():
  """The one list names real fields, and none that changes what training computes."""
  fields = set(tiny_config().keys())
  assert set(workdir.RESUME_SAFE_FIELDS) <= fields
  assert set(workdir.FINAL_EVALUATION_FIELDS) <= fields
  assert not {"log_every", "eval_every", "n_eval_points", "eval_pgd_steps", "eval_step_alpha",
              "seed", "eps", "method"} & (set(workdir.RESUME_SAFE_FIELDS)
                                           | set(workdir.FINAL_EVALUATION_FIELDS))


def test_an_unreadable_config_json_is_one_error(tmp_path):
  (tmp_path / "config.json").write_text('{"eps": 0.1, "meth')
  with pytest.raises(workdir.WorkdirError, match="config.json cannot be read"):
    workdir.check_rerun(tiny_config(), str(tmp_path))


def test_a_checkpoint_that_does_not_fit_is_explained_by_what_it_was_written_with():
  """workdir.mismatch_cause, from a checkpoint's `written_with` record: the fields that differ
  with the flags that resume it, else the device count, else (no record) the likely cause."""
  config = tiny_config()
  written = workdir.written_with(config)
  assert written["devices"] == jax.device_count() and written["processes"] == 1
  other = workdir.mismatch_cause(written, tiny_config(n_filters=8, method="pgd"))
  assert other.startswith('it was written with method="fgsm" (now "pgd"), '
                          'model_args.small_cnn.n_filters=4 (now 8); ')
  assert ('resume with --config.method=fgsm --config.model_args.small_cnn.n_filters=4,'
          in other)
  devices = workdir.mismatch_cause(dict(written, devices=2), config)
  assert devices.startswith(f"it was written on 2 device(s) in 1 process(es), this run has "
                            f"{jax.device_count()} in 1: resume it with 2 device(s)")
  assert "was it edited?" in workdir.mismatch_cause(None, config)
  # fields a resume may change (where the data is) are no cause: the device count is
  moved = workdir.mismatch_cause(dict(workdir.written_with(tiny_config(data_dir="/old")),
                                      devices=2), config)
  assert moved.startswith("it was written on 2 device(s)"), moved
  # a sequence is given as a flag value the shell and ml_collections read back
  means = workdir.mismatch_cause(workdir.written_with(tiny_config(input_mean=(0.5,),
                                                                  input_std=(0.25,))), config)
  assert "--config.input_mean='(0.5,)' --config.input_std='(0.25,)'" in means, means
  for cause in (other, devices, workdir.mismatch_cause(None, config)):
    assert "delete" not in cause


@pytest.mark.parametrize("record,refused", [
    ({"clean_acc": 0.5, "pgd_acc": 0.4, "n_eval": 8}, None),
    ({"clean_acc": 0.5, "pgd_acc": 0.6, "n_eval": 8}, "pgd_acc 0.6 is above clean_acc 0.5"),
    # AutoAttack's own clean pass may differ from the evaluator's on boundary points
    ({"clean_acc": 0.5, "autoattack_acc": 0.55, "autoattack_clean_acc": 0.6, "n_eval": 8}, None),
    ({"clean_acc": 0.5, "autoattack_acc": 0.55, "autoattack_clean_acc": 0.5, "n_eval": 8},
     "autoattack_acc 0.55 is above autoattack_clean_acc 0.5"),
    # a randomised model: the mean over fresh draws may exceed the clean draws'
    ({"clean_acc": 0.5, "autoattack_acc": 0.55, "autoattack_clean_acc": 0.5,
      "autoattack_draws": 4, "n_eval": 8}, None),
    ({"clean_acc": True}, "clean_acc True is not an accuracy"),
    ({"averaged": {"clean_acc": 0.5, "pgd_acc": 0.7, "n_eval": 8}},
     "averaged.pgd_acc 0.7 is above averaged.clean_acc 0.5"),
])
def test_results_read_back_are_numbers_this_library_could_have_written(record, refused):
  if refused is None:
    workdir.check_results(record, "r.json")
  else:
    with pytest.raises(workdir.WorkdirError, match=re.escape(refused)):
      workdir.check_results(record, "r.json")


def test_every_json_file_written_is_valid_json(tmp_path):
  """Python's json writes NaN and Infinity, which strict readers (and other languages) refuse:
  write_json gives null instead, everywhere in the structure."""
  path = tmp_path / "out.json"
  workdir.write_json(str(path), {"eps": float("inf"), "rows": [1.0, float("nan")],
                                 "nested": {"x": float("-inf"), "y": 0.5}})
  text = path.read_text()
  assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard {c}")) == {
      "eps": None, "rows": [1.0, None], "nested": {"x": None, "y": 0.5}}
