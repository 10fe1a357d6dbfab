"""Every refusal of a command line is exactly one line (stdout and stderr together: no
TensorFlow / absl / XLA start-up notices before it), exit code 2, and leaves the workdir as it
was. Each case runs the real command line (`python -m fastadv_jax.<command>`) in a subprocess,
with the variables that would quieten the libraries taken out of its environment, so that the
command's own quieting is what is tested (cli_logging.quiet_startup)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI, load_config
from fastadv_jax.runtime import cli_logging
from fastadv_jax.training import metric_writers, workdir

# Set by conftest for the test process, or by a user's shell: each would hide what is tested.
_QUIETING = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "JAX_PLATFORMS", "JAX_LOGGING_LEVEL",
             cli_logging.VERBOSE_ENV)
DEFAULT_CONFIG = str(ROOT / "configs" / "default.py")


def _env(**extra: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in _QUIETING}
  return dict(env, JAX_NUM_CPU_DEVICES="1", **extra)


def _run(command: str, *args: str, timeout: float = 120, **env: str
         ) -> subprocess.CompletedProcess:
  """`python -m fastadv_jax.<command> <args>`, stdout and stderr as one stream."""
  return subprocess.run([sys.executable, "-m", f"fastadv_jax.{command}", *args], cwd=ROOT,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=timeout, env=_env(**env))


def _assert_one_line(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
  lines = proc.stdout.splitlines()
  assert proc.returncode == code, proc.stdout[-3000:]
  assert len(lines) == 1, proc.stdout[-3000:]
  assert lines[0].startswith("error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def _snapshot(path: pathlib.Path):
  """Every file below `path` with its bytes and modification time (None if path is absent)."""
  if not path.exists():
    return None
  return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"",
                 p.stat().st_mtime_ns) for p in [path, *path.rglob("*")])


def _run_workdir(path: pathlib.Path, checkpoint_dirs: tuple[str, ...] = ()) -> pathlib.Path:
  """A workdir holding the default config's config.json and, optionally, checkpoint folders."""
  path.mkdir(parents=True)
  workdir.write_json(str(path / "config.json"), workdir.config_dict(load_config()))
  for name in checkpoint_dirs:
    (path / "checkpoints" / name).mkdir(parents=True)
  return path


# --- start-up noise ------------------------------------------------------------------------

def test_a_config_error_is_the_only_line(tmp_path):
  """The JAX backend starts before this check (the device count): its notices stay hidden."""
  wd = tmp_path / "wd"
  _assert_one_line(_run("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}",
                        "--config.eps=2"), "config.eps")
  assert not wd.exists()


def test_evaluate_on_a_missing_workdir_is_the_only_line():
  _assert_one_line(_run("evaluate", "--workdir=/nonexistent-workdir"),
                   "/nonexistent-workdir/config.json")


def test_quiet_startup_sets_only_what_the_user_left_unset(monkeypatch):
  import logging
  for name in _QUIETING:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "1")  # the user's choice is kept
  jax_logger = logging.getLogger("jax")
  monkeypatch.setattr(jax_logger, "level", logging.NOTSET)
  cli_logging.quiet_startup()
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "2"
  assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"
  assert jax_logger.level == logging.WARNING


def test_fastadv_verbose_changes_nothing(monkeypatch):
  import logging
  for name in _QUIETING:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv(cli_logging.VERBOSE_ENV, "1")
  jax_logger = logging.getLogger("jax")
  monkeypatch.setattr(jax_logger, "level", logging.NOTSET)
  cli_logging.quiet_startup()
  assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "TF_ENABLE_ONEDNN_OPTS" not in os.environ
  assert jax_logger.level == logging.NOTSET


_NOISE = ("oneDNN", "absl::InitializeLog", "Unable to initialize backend", "cpu_feature_guard",
          "xla_bridge", "rebuild TensorFlow")


def test_a_training_run_shows_its_own_lines_and_no_library_notices(tmp_path):
  wd = tmp_path / "wd"
  proc = subprocess.run(
      [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main", f"--config={DEFAULT_CONFIG}",
       f"--workdir={wd}", *TINY_CLI], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, timeout=300, env=_env())
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "train.py" in proc.stdout and "Results:" in proc.stdout, proc.stdout[-3000:]
  for noise in _NOISE:
    assert noise not in proc.stdout, (noise, proc.stdout[-3000:])


# --- command lines --------------------------------------------------------------------------

@pytest.mark.parametrize("command,args", [
    ("main", [f"--config={DEFAULT_CONFIG}"]),
    ("evaluate", []),
    ("torch_export", ["--out={tmp}/export"]),
    ("torch_import", ["--state_dict={tmp}/sd.npz", f"--config={DEFAULT_CONFIG}"]),
])
def test_a_positional_argument_is_refused(command, args, tmp_path):
  wd = _run_workdir(tmp_path / "wd", ("5",))
  before = _snapshot(tmp_path)
  args = [a.format(tmp=tmp_path) for a in args]
  line = _assert_one_line(_run(command, f"--workdir={wd}", *args, "attack=autoattack"),
                          "unexpected argument 'attack=autoattack'")
  if command == "evaluate":
    assert "did you mean --attack=autoattack?" in line
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("args,needle", [
    (["stray"], "unrecognized arguments: stray"),
    (["--models=nope"], "--models: unknown model 'nope'"),
])
def test_benchmark_refusals_are_one_line(args, needle, tmp_path):
  out = tmp_path / "bench.json"
  _assert_one_line(_run("benchmark", f"--out={out}", *args), needle)
  assert not out.exists()


def test_an_unknown_flag_keeps_its_closing_quote():
  _assert_one_line(_run("evaluate", "--workdir=/nonexistent-workdir", "--progress"),
                   "Unknown command line flag 'progress'")


@pytest.mark.parametrize("command,extra", [
    ("main", []),
    ("torch_import", ["--state_dict=/nonexistent.npz"]),
])
def test_a_missing_config_file_is_one_line_naming_it(command, extra, tmp_path):
  wd = tmp_path / "wd"
  _assert_one_line(_run(command, f"--workdir={wd}", "--config=configs/nope.py", *extra),
                   "--config", "configs/nope.py")
  assert not wd.exists()


@pytest.mark.parametrize("command,extra", [
    ("evaluate", []),
    ("torch_export", ["--out={tmp}/export"]),
    ("main", [f"--config={DEFAULT_CONFIG}"]),
])
def test_a_truncated_config_json_is_one_line_naming_it(command, extra, tmp_path):
  wd = _run_workdir(tmp_path / "wd", ("5",))
  path = wd / "config.json"
  path.write_bytes(path.read_bytes()[:100])
  before = _snapshot(tmp_path)
  _assert_one_line(_run(command, f"--workdir={wd}", *[a.format(tmp=tmp_path) for a in extra]),
                   str(path))
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command,extra", [
    ("evaluate", []),
    ("torch_export", ["--out={tmp}/export"]),
])
def test_a_run_stopped_before_its_first_checkpoint_is_one_line(command, extra, tmp_path):
  # checkpoints/ made, the first save cut off: Orbax's temporary folder, no finished step
  wd = _run_workdir(tmp_path / "wd", ("4.orbax-checkpoint-tmp-1700000000",))
  before = _snapshot(tmp_path)
  _assert_one_line(_run(command, f"--workdir={wd}", *[a.format(tmp=tmp_path) for a in extra]),
                   "no checkpoint in", str(wd / "checkpoints"))
  assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("content", [b"not an archive\n", b"\x93NUMPY\x01\x00v\x00{}"])
def test_importing_a_file_that_is_not_an_npz_is_one_line(content, tmp_path):
  bad = tmp_path / "weights.npz"
  bad.write_bytes(content)
  wd = tmp_path / "wd"
  _assert_one_line(_run("torch_import", f"--state_dict={bad}", f"--config={DEFAULT_CONFIG}",
                        f"--workdir={wd}"), "--state_dict", str(bad))
  assert not wd.exists()


def test_importing_a_wide_resnet_of_another_depth_is_one_line(tmp_path):
  """A WideResNet-16-1 state_dict under a config of depth 10 would lose the second block of
  every group: refused, both architectures and the flag to set named, nothing written."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from test_torch_interop import CIFAR, _random_like, _shapes, _wrn_config
  from fastadv_jax.interop import torch_interop  # pylint: disable=import-outside-toplevel
  file_config = _wrn_config(16, 1)
  np.savez(tmp_path / "wrn16.npz", **torch_interop.to_torch_state_dict(
      file_config, _random_like(_shapes(file_config), 0), CIFAR))
  wd = tmp_path / "wd"
  _assert_one_line(_run("torch_import", f"--state_dict={tmp_path / 'wrn16.npz'}",
                        f"--config={DEFAULT_CONFIG}", "--config.model=wide_resnet",
                        "--config.dataset=cifar10", "--config.model_args.wide_resnet.depth=10",
                        "--config.model_args.wide_resnet.widen=1", f"--workdir={wd}"),
                   "the state_dict is a wide_resnet with depth=16, widen=1, this config "
                   "has depth=10, widen=1: set --config.model_args.wide_resnet.depth=16")
  assert not wd.exists()


def test_damaged_metrics_lines_are_skipped(tmp_path):
  good = [{"step": 2, "epoch": 0.1, "train_loss": 1.0}, {"step": 4, "epoch": 0.2}]
  lines = [json.dumps(good[0]).encode(), b"5", b"[1, 2]", b'{"step": "x"}', b"\xff\xfe{",
           json.dumps(good[1]).encode(), b'{"step": 6, "train_lo']
  (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  assert metric_writers.read_metrics(str(tmp_path)) == good
  writer = metric_writers.MetricWriter(str(tmp_path), resume_step=2)  # a resume keeps rows <= 2
  writer.close()
  assert metric_writers.read_metrics(str(tmp_path)) == good[:1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_a_process_whose_peers_never_come_says_so_in_bounded_time(tmp_path):
  """Process 0 of 2 started alone: one line naming the coordinator, exit 2, within the timeout
  (plus start-up), nothing written."""
  address = f"127.0.0.1:{_free_port()}"
  wd = tmp_path / "wd"
  start = time.monotonic()
  proc = _run("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}",
              f"--coordinator_address={address}", "--num_processes=2", "--process_id=0",
              "--distributed_timeout=5", timeout=90)
  elapsed = time.monotonic() - start
  _assert_one_line(proc, address, "5 s", "--distributed_timeout")
  assert elapsed < 60, elapsed
  assert not wd.exists()


def test_the_timeout_comes_from_the_environment_too(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  proc = _run("main", f"--config={DEFAULT_CONFIG}", f"--workdir={tmp_path / 'wd'}",
              f"--coordinator_address={address}", "--num_processes=2", "--process_id=1",
              timeout=90, FASTADV_DISTRIBUTED_TIMEOUT="3")
  _assert_one_line(proc, address, "3 s", "process 1 of 2")


# --- export never overwrites what it did not write ----------------------------------------

@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
  """A workdir with checkpoint 0: the default model's initial weights, saved as an import."""
  from fastadv_jax.training import checkpointing, saved_run  # pylint: disable=import-outside-toplevel
  wd = _run_workdir(tmp_path_factory.mktemp("run") / "wd")
  ckpt = checkpointing.Checkpointer(str(wd))
  try:
    ckpt.save_variables(0, saved_run.variables_template(load_config()), {"best_step": 0})
  finally:
    ckpt.close()
  return wd


def test_export_refuses_a_users_file_before_any_work(imported_run, tmp_path):
  out = tmp_path / "export"
  out.mkdir()
  (out / "model.py").write_text("# my own model\n")
  before = _snapshot(out)
  _assert_one_line(_run("torch_export", f"--workdir={imported_run}", f"--out={out}"),
                   str(out / "model.py"), "--force")
  assert _snapshot(out) == before
  assert (out / "model.py").read_text() == "# my own model\n"


def test_export_rewrites_its_own_files_and_force_overwrites(imported_run, tmp_path):
  out = tmp_path / "export"
  first = _run("torch_export", f"--workdir={imported_run}", f"--out={out}")
  assert first.returncode == 0, first.stdout[-3000:]
  assert (out / ".fastadv_export.json").exists()
  again = _run("torch_export", f"--workdir={imported_run}", f"--out={out}")
  assert again.returncode == 0, again.stdout[-3000:]  # its own, unchanged files
  (out / "spec.json").write_text('{"edited": true}')  # the user's edit is theirs now
  before = _snapshot(out)
  _assert_one_line(_run("torch_export", f"--workdir={imported_run}", f"--out={out}"),
                   str(out / "spec.json"), "changed since the last export")
  assert _snapshot(out) == before
  forced = _run("torch_export", f"--workdir={imported_run}", f"--out={out}", "--force")
  assert forced.returncode == 0, forced.stdout[-3000:]
  assert json.loads((out / "spec.json").read_text())["architecture"]


def test_export_into_a_file_is_one_line(imported_run, tmp_path):
  out = tmp_path / "a_file"
  out.write_text("x")
  _assert_one_line(_run("torch_export", f"--workdir={imported_run}", f"--out={out}"),
                   str(out), "not a folder")
  assert out.read_text() == "x"


# --- a finished run's numbers, evaluation files, checkpoints that do not fit ---------------

def _mock(command: str, *args: str, env: dict | None = None, timeout: float = 300,
          separate: bool = False) -> subprocess.CompletedProcess:
  """`<command>.run()` on TFDS's mock data (conftest.MOCK_DATA_CLI); stdout and stderr as one
  stream unless `separate`."""
  return subprocess.run([sys.executable, "-c", MOCK_DATA_CLI, f"fastadv_jax.{command}", *args],
                        cwd=ROOT, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE if separate else subprocess.STDOUT, text=True,
                        timeout=timeout, env=_env(**(env or {})))


def _assert_ends_in_one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
  """For a command run on mock data (whose TFDS stand-in logs lines of its own) that may have
  logged its start: exit 2, no traceback, and the last line the only error line."""
  lines = proc.stdout.strip().splitlines()
  assert proc.returncode == 2, proc.stdout[-3000:]
  assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
  assert [ln for ln in lines if ln.startswith("error: ")] == lines[-1:], proc.stdout[-3000:]
  for needle in needles:
    assert needle in lines[-1], (needle, lines[-1])
  return lines[-1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> pathlib.Path:
  wd = tmp_path_factory.mktemp("tiny") / "run"
  proc = _mock("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}", *TINY_CLI)
  assert proc.returncode == 0, proc.stdout[-3000:]
  return wd


@pytest.mark.parametrize("command,args,needle", [
    ("main", ["--config.eps=abc"], "--config.eps: not a number: 'abc'"),
    ("main", ["--config.validation_size=1.5"], "--config.validation_size: not an integer: '1.5'"),
    ("main", ["--config.method_args.fgsm.alpha=abc"], "--config.method_args.fgsm.alpha: not a "
     "number"),
    ("main", ["--config.method_args.pgd.steps=2.5"], "--config.method_args.pgd.steps: not an "
     "integer"),
    ("main", ["--config.progress_bar=maybe"], "--config.progress_bar: not true or false"),
    ("evaluate", ["--norm=l2"], "--norm: value should be one of <Linf|L2|L1>"),
])
def test_a_value_that_does_not_parse_names_its_flag(command, args, needle, tmp_path):
  wd = tmp_path / "wd"
  config = [f"--config={DEFAULT_CONFIG}"] if command == "main" else []
  _assert_one_line(_run(command, *config, f"--workdir={wd}", *args), needle)
  assert not wd.exists()


def test_a_config_file_that_returns_no_config_is_one_line(tmp_path):
  (tmp_path / "forty_two.py").write_text("def get_config():\n  return 42\n")
  wd = tmp_path / "wd"
  _assert_one_line(_run("main", f"--config={tmp_path / 'forty_two.py'}", f"--workdir={wd}"),
                   "--config: get_config() in", "returned int 42, not an "
                   "ml_collections.ConfigDict")
  assert not wd.exists()


@pytest.mark.parametrize("edit,needle", [
    ({"pgd_acc": 1.5}, "pgd_acc 1.5 is not an accuracy in [0, 1]"),
    ({"clean_acc": float("nan")}, "clean_acc nan is not an accuracy in [0, 1]"),
    ({"clean_acc": 0.05, "pgd_acc": 0.1}, "pgd_acc 0.1 is above clean_acc 0.05"),
    ({"best": {"clean_acc": -0.5}}, "best.clean_acc -0.5 is not an accuracy"),
])
def test_a_results_json_changed_by_hand_is_never_printed(edit, needle, tiny_run, tmp_path):
  """A rerun of a finished run prints its recorded numbers: only numbers this library could
  have written. NaN is written as Python's json writes it (not valid JSON, but readable)."""
  wd = tmp_path / "run"
  shutil.copytree(tiny_run, wd)
  results = json.loads((wd / "results.json").read_text())
  for key, value in edit.items():
    if isinstance(value, dict):
      results[key].update(value)
    else:
      results[key] = value
  (wd / "results.json").write_text(json.dumps(results))
  before = _snapshot(wd)
  line = _assert_one_line(_run("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}",
                               *TINY_CLI), "results.json was changed outside fastadv_jax",
                          needle)
  assert "restore it, or move it away" in line
  assert _snapshot(wd) == before


def test_evaluate_refuses_an_infinite_radius(tiny_run):
  before = _snapshot(tiny_run)
  _assert_one_line(_run("evaluate", f"--workdir={tiny_run}", "--norm=L2", "--eps=inf"),
                   "--eps: must be a finite number, got inf")
  assert _snapshot(tiny_run) == before


def test_evaluations_with_another_seed_or_budget_never_share_a_file(tiny_run, tmp_path):
  """The seed and AutoAttack's budgets change the numbers: each is in the file's name (when
  not the default) and in its JSON, so a second evaluation never replaces the first. The
  command prints its JSON and nothing else (no Orbax line on reading the checkpoint)."""
  wd = tmp_path / "run"
  shutil.copytree(tiny_run, wd)
  common = [f"--workdir={wd}", "--n_eval=4", "--pgd_steps=2", "--pgd_restarts=1"]
  outputs = {}
  for extra in ([], ["--seed=1"], ["--seed=1", "--attack=apgd-ce", "--apgd_steps=3"]):
    proc = _mock("evaluate", *common, *extra, separate=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Metadata file does not exist" not in proc.stderr  # Orbax, reading the checkpoint
    record = json.loads(proc.stdout)  # stdout is the JSON alone
    outputs[tuple(extra)] = record
  names = sorted(p.name for p in wd.glob("eval_*.json"))
  assert names == ["eval_last_eps0.1000_n4_aa-apgd-ce-apgd3_seed1.json",
                   "eval_last_eps0.1000_n4_pgd2x1.json",
                   "eval_last_eps0.1000_n4_pgd2x1_seed1.json"], names
  for name in names:
    assert (wd / name).with_suffix(".npz").is_file()
  assert [r["seed"] for r in outputs.values()] == [0, 1, 1]
  aa = outputs[("--seed=1", "--attack=apgd-ce", "--apgd_steps=3")]
  assert aa["autoattack_settings"] == {"apgd_steps": 3, "fab_steps": 100, "square_queries": 5000}
  assert json.loads((wd / names[0]).read_text()) == aa


def _unfinished_copy(tiny_run: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  shutil.copytree(tiny_run, dest)
  (dest / "results.json").unlink()
  return dest


def test_a_checkpoint_that_does_not_fit_says_why_and_how_to_resume(tiny_run, tmp_path):
  """config.json edited by hand (the small CNN's n_filters 4 -> 8) and the command changed to
  match: the checkpoint no longer fits. The line names the field and the value it was written
  with, and the flag that resumes it; it never advises deleting the checkpoint, which is
  kept."""
  wd = _unfinished_copy(tiny_run, tmp_path / "run")
  recorded = json.loads((wd / "config.json").read_text())
  assert recorded["model_args"]["small_cnn"]["n_filters"] == 4
  recorded["model_args"]["small_cnn"]["n_filters"] = 8
  (wd / "config.json").write_text(json.dumps(recorded))
  before = _snapshot(wd / "checkpoints")
  line = _assert_ends_in_one_error(
      _mock("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}", *TINY_CLI,
            "--config.model_args.small_cnn.n_filters=8"),
      "does not fit this config", "the checkpoint is kept",
      "it was written with model_args.small_cnn.n_filters=4 (now 8)",
      "resume with --config.model_args.small_cnn.n_filters=4")
  assert "delete" not in line
  assert _snapshot(wd / "checkpoints") == before


_BAD_PLUGINS = {
    "wrong_shape": ("def perturb(inp):\n  return Perturbation(jax.numpy.zeros(inp.x.shape[:-1]))\n",
                    "returned a delta of shape (16, 28, 28) for a batch of shape (16, 28, 28, 1)"),
    "wrong_signature": ("def perturb(inp, extra):\n  return Perturbation(inp.x * 0)\n",
                        "TypeError: perturb() missing 1 required positional argument: 'extra'"),
    "not_a_perturbation": ("def perturb(inp):\n  return inp.x * 0\n",
                           "returned an array of shape (16, 28, 28, 1), not a "
                           "methods.base.Perturbation"),
}


@pytest.mark.parametrize("name", sorted(_BAD_PLUGINS))
def test_a_run_whose_first_step_fails_leaves_its_workdir_free(name, tmp_path):
  """A plugin method that cannot be traced fails at the first step, in one line naming it;
  config.json is written by then, but no checkpoint: the same workdir then trains another
  method (the config is replaced, not refused as "recorded with another config")."""
  body, needle = _BAD_PLUGINS[name]
  (tmp_path / f"{name}.py").write_text(
      "import jax\nfrom fastadv_jax import methods\n"
      "from fastadv_jax.methods.base import Method, Perturbation\n" + body +
      f"methods.register(Method({name!r}, 'a broken plugin', perturb))\n")
  wd = tmp_path / "wd"
  env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
  line = _assert_ends_in_one_error(
      _mock("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}", *TINY_CLI,
            f"--config.plugins={name}", f"--config.method={name}", env=env),
      f"method {name!r}", needle)
  assert "no checkpoint, so any config may be run in it" in line
  assert json.loads((wd / "config.json").read_text())["method"] == name
  proc = _mock("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}", *TINY_CLI)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert json.loads((wd / "results.json").read_text())["method"] == "fgsm"


def test_a_recorded_run_with_a_checkpoint_still_refuses_another_config(tiny_run, tmp_path):
  """The free workdir above is only for a run with nothing to resume."""
  wd = _unfinished_copy(tiny_run, tmp_path / "run")
  before = _snapshot(wd)
  _assert_one_line(_run("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}", *TINY_CLI,
                        "--config.seed=1"), "holds a run recorded with another config (seed")
  assert _snapshot(wd) == before


def test_every_command_line_loads_installed_plugins(tmp_path):
  """torch_export of a run whose model comes from an installed package (an entry point, no
  config.plugins): the model is found (and refused for export: it has no PyTorch layout),
  not reported as unknown."""
  site = tmp_path / "site"
  info = site / "my_model_pkg-0.1.dist-info"
  info.mkdir(parents=True)
  (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-model-pkg\nVersion: 0.1\n")
  (info / "entry_points.txt").write_text(
      "[fastadv_jax.plugins]\nmy_model_no_torch = my_model_no_torch\n")
  wd = _run_workdir(tmp_path / "wd", ("1",))
  recorded = json.loads((wd / "config.json").read_text())
  (wd / "config.json").write_text(json.dumps(dict(recorded, model="my_model_no_torch",
                                                  plugins="")))
  env = {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "tests" / "plugins")])}
  line = _assert_one_line(_run("torch_export", f"--workdir={wd}", f"--out={tmp_path / 'out'}",
                               **env), "my_model_no_torch")
  assert "unknown model" not in line and "PyTorch" in line, line


def test_an_empty_checkpoint_folder_is_one_line(tmp_path):
  """A checkpoint folder with nothing in it (an interrupted copy): the export says it cannot be
  restored, in one line, without Orbax's own warning about the missing item."""
  wd = _run_workdir(tmp_path / "wd", ("1",))
  line = _assert_one_line(_run("torch_export", f"--workdir={wd}", f"--out={tmp_path / 'out'}"),
                          "could not be restored")
  assert "no state item" in line, line


def test_a_data_folder_without_the_prepared_data_set_is_one_line(tmp_path):
  """TFDS warns about a version folder without dataset_info.json before the library's own
  error says what is missing and how to get it: only the latter is printed."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  (tmp_path / "data" / "cifar10" / str(tfds.builder_cls("cifar10").VERSION)).mkdir(parents=True)
  wd = tmp_path / "wd"
  _assert_one_line(_run("main", f"--config={DEFAULT_CONFIG}", f"--workdir={wd}",
                        "--config.dataset=cifar10", f"--config.data_dir={tmp_path / 'data'}",
                        "--config.download=False"),
                   "dataset 'cifar10' (split 'train') is not prepared in")
  assert not wd.exists()


def _written_before_model_args(config: dict) -> dict:
  """`config` as the versions before model_args wrote it: the models' sizes as top-level
  fields (the run's model's n_filters, the CNN's n_layers, ...), no model_args."""
  args = config["model_args"]
  old = {k: v for k, v in config.items() if k != "model_args"}
  old.update(n_filters=args[config["model"]]["n_filters"], n_layers=args["cnn"]["n_layers"],
             use_batch_norm=args["small_cnn"]["use_batch_norm"],
             resnet_widths=args["preact_resnet18"]["stage_widths"],
             wrn_depth=args["wide_resnet"]["depth"], wrn_widen=args["wide_resnet"]["widen"])
  return old


def _without_times(d):
  if isinstance(d, dict):
    return {k: _without_times(v) for k, v in d.items() if "time" not in k and "seconds" not in k}
  return d


def test_a_workdir_written_before_model_args_evaluates_exports_and_resumes(tiny_run, tmp_path):
  """A run whose config.json (and results.json) hold the models' sizes as top-level fields, as
  every version before model_args wrote them: `evaluate` gives the numbers it gives on the run
  as written now, `torch_export` writes the same arrays, and the unfinished run resumes with
  today's flags to the results of the run trained without a stop."""
  now, old = tmp_path / "now", tmp_path / "old"
  for wd in (now, old):
    shutil.copytree(tiny_run, wd, ignore=shutil.ignore_patterns("eval_*"))
  config = json.loads((old / "config.json").read_text())
  (old / "config.json").write_text(json.dumps(_written_before_model_args(config)))
  results = json.loads((old / "results.json").read_text())
  (old / "results.json").write_text(json.dumps(dict(
      results, config=_written_before_model_args(results["config"]))))
  evaluated = {}
  for name, wd in (("now", now), ("old", old)):
    proc = _mock("evaluate", f"--workdir={wd}", "--pgd_steps=2", "--pgd_restarts=1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    [out] = wd.glob("eval_last_*.json")
    evaluated[name] = _without_times(json.loads(out.read_text()))
    proc = _mock("torch_export", f"--workdir={wd}", f"--out={tmp_path / ('export_' + name)}")
    assert proc.returncode == 0, proc.stdout[-3000:]
  assert evaluated["old"] == evaluated["now"]
  with np.load(tmp_path / "export_now" / "state_dict.npz") as a, \
       np.load(tmp_path / "export_old" / "state_dict.npz") as b:
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
  (old / "results.json").unlink()  # unfinished: its last checkpoint, then the final evaluation
  proc = _mock("main", f"--config={DEFAULT_CONFIG}", f"--workdir={old}", *TINY_CLI)
  assert proc.returncode == 0, proc.stdout[-3000:]
  assert "config.json was written before model_args" in proc.stdout
  resumed = json.loads((old / "results.json").read_text())
  assert _without_times(dict(resumed, config=None)) == _without_times(dict(results, config=None))
