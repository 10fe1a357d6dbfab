"""Fault injection: interruptions at chosen points then resumption, compared field by field with
an uninterrupted run; damaged checkpoints and metrics; concurrent starts; bad input on the
command lines (one line, the field's name, a non-zero exit, the workdir untouched)."""
import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI, tiny_config
from fastadv_jax.training import (checkpoint_manifests, checkpointing, evaluation,
                                  metric_writers, monitoring, train, workdir)

# 6 iterations; diagnostics at 4 and 6; checkpoints at 2, 4, 6 (the last two kept).
CONFIG = dict(checkpoint_every=2, keep_checkpoints=2)
VOLATILE = ("train_time_s", "wall_time_s")


class _Killed(BaseException):
  """Stands for SIGKILL: nothing runs on the way out (not an Exception, not a KeyboardInterrupt)."""


@contextlib.contextmanager
def _raise_in(obj, name, exc, when=lambda *a, **k: True):
  """Makes obj.name raise `exc` on the first call for which `when(*args)` holds."""
  original = getattr(obj, name)
  fired = []

  def patched(*args, **kwargs):
    if not fired and when(*args, **kwargs):
      fired.append(True)
      raise exc
    return original(*args, **kwargs)

  setattr(obj, name, patched)
  try:
    yield fired
  finally:
    setattr(obj, name, original)


def _results(wd):
  r = json.loads((pathlib.Path(wd) / "results.json").read_text())
  return {k: v for k, v in r.items() if k not in VOLATILE}


def _metrics(wd):
  return metric_writers.read_metrics(str(wd))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  import tensorflow_datasets as tfds
  wd = tmp_path_factory.mktemp("reference")
  with tfds.testing.mock_data(num_examples=48):
    train.train_and_evaluate(tiny_config(**CONFIG), str(wd))
  return _results(wd), _metrics(wd)


def _assert_same_as_reference(wd, reference):
  results, metrics = reference
  got = _results(wd)
  assert got.keys() == results.keys()
  for k in results:
    if k == "step_time_s":
      continue  # a time
    assert got[k] == results[k], k
  assert _metrics(wd) == metrics  # every row, every value


@pytest.mark.parametrize("where,exc", [
    ("diagnostics", _Killed), ("diagnostics", KeyboardInterrupt),
    ("checkpoint", _Killed), ("final_evaluation", _Killed), ("final_evaluation",
                                                             KeyboardInterrupt),
    ("step", KeyboardInterrupt),
])
def test_interrupted_then_resumed_equals_uninterrupted(where, exc, tmp_path, mock_fashion_mnist,
                                                       reference):
  config = tiny_config(**CONFIG)
  targets = {
      "diagnostics": (monitoring.Monitor, "run", lambda self, step, *v: step == 4),
      "checkpoint": (checkpoint_manifests, "_digest", lambda d: d.endswith(os.sep + "4")),
      "final_evaluation": (evaluation, "final_evaluation", lambda *a: True),
      "step": (train._Run, "step", lambda self, step: step == 3),  # inside iteration 4
  }
  obj, name, when = targets[where]
  with _raise_in(obj, name, exc, when) as fired, pytest.raises(exc):
    train.train_and_evaluate(config, str(tmp_path))
  assert fired
  assert not (tmp_path / "results.json").exists()
  train.train_and_evaluate(config, str(tmp_path))
  _assert_same_as_reference(tmp_path, reference)
  train.train_and_evaluate(config, str(tmp_path))  # a rerun of a finished run changes nothing
  _assert_same_as_reference(tmp_path, reference)
  assert json.loads((tmp_path / "results.json").read_text())["final_train_metrics"]


def test_a_truncated_metrics_line_does_not_stop_the_resume(tmp_path, mock_fashion_mnist,
                                                           reference):
  config = tiny_config(**CONFIG)
  with _raise_in(train._Run, "step", _Killed, lambda self, step: step == 5), \
       pytest.raises(_Killed):
    train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "train_lo')  # killed mid-write
  train.train_and_evaluate(config, str(tmp_path))
  _assert_same_as_reference(tmp_path, reference)


def _garble_same_size(step_dir):
  files = sorted((p for p in pathlib.Path(step_dir, "state").rglob("*") if p.is_file()),
                 key=lambda p: -p.stat().st_size)
  data = bytearray(files[0].read_bytes())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes((b ^ 0xFF) for b in data[mid:mid + 16])
  files[0].write_bytes(bytes(data))


def test_a_garbled_checkpoint_is_detected_and_the_previous_one_used(tmp_path, mock_fashion_mnist,
                                                                    reference, caplog):
  config = tiny_config(**CONFIG)
  with _raise_in(train._Run, "step", _Killed, lambda self, step: step == 5), \
       pytest.raises(_Killed):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpointing.Checkpointer(str(tmp_path)).latest_step() == 4
  _garble_same_size(tmp_path / "checkpoints" / "4")
  train.train_and_evaluate(config, str(tmp_path))  # falls back to iteration 2
  assert "differ from their checksums" in caplog.text
  assert any((tmp_path / "corrupt_checkpoints").iterdir())
  _assert_same_as_reference(tmp_path, reference)


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path, mock_fashion_mnist):
  config = tiny_config(**CONFIG)
  with workdir.Lock(str(tmp_path)):  # another run holds the workdir
    with pytest.raises(workdir.WorkdirError, match=f"in use by another run .process {os.getpid()}"):
      train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "config.json").exists()
  (tmp_path / ".lock").write_text("999999")  # stale: its owner died without unlocking
  train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "results.json").exists()


def test_a_refused_rerun_leaves_the_finished_run_intact(tmp_path, mock_fashion_mnist):
  from fastadv_jax import evaluate
  train.train_and_evaluate(tiny_config(**CONFIG), str(tmp_path))
  before = (tmp_path / "config.json").read_text()
  with pytest.raises(workdir.RunChangedError, match="model_args.small_cnn.n_filters 4 -> 8"):
    train.train_and_evaluate(tiny_config(n_filters=8, **CONFIG), str(tmp_path))
  assert (tmp_path / "config.json").read_text() == before
  config, _, step = evaluate.load_run(str(tmp_path))
  assert step == 6 and config.model_args.small_cnn.n_filters == 4


def test_a_nan_stop_closes_everything(tmp_path):
  """The NaN stop ends in one line and exit 2, without an exit-time traceback."""
  proc = _cli(["fastadv_jax.main", f"--workdir={tmp_path}", "--config.lr_max=1e30",
               "--config.lr_schedule=constant", "--config.grad_align_lambda=0.0",
               "--config.log_every=1"], timeout=300)
  _assert_one_line_error(proc, "non-finite loss or gradient")


def test_out_of_memory_at_the_first_step_is_one_line_and_leaves_the_workdir_free(
    tmp_path, mock_fashion_mnist):
  """XLA's RESOURCE_EXHAUSTED (a batch too large for the device; it cannot happen on this
  CPU machine, so it is raised where the first step's results are read): one StartError line
  naming the batch size, and a smaller batch then runs in the same workdir."""
  from fastadv_jax.training import engines  # pylint: disable=import-outside-toplevel
  oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.50GiB.\n"
                     "BufferAssignment OOM Debugging ...")
  with _raise_in(engines.PmapEngine, "local_metrics", oom) as fired:
    with pytest.raises(train.StartError) as err:
      train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
  assert fired
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith("the first step ran out of memory with config.batch_size=16 ")
  assert "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.50GiB." in message
  assert "lower the batch size (the workdir holds no checkpoint" in message
  results = train.train_and_evaluate(tiny_config(num_epochs=1, batch_size=8), str(tmp_path))
  assert results["config"]["batch_size"] == 8


def test_a_library_error_at_the_first_step_keeps_its_traceback(tmp_path, mock_fashion_mnist):
  """Only what the user can fix becomes one line: an error inside the library's own method and
  model (no plugin, not out of memory) propagates as it is."""
  from fastadv_jax.training import engines  # pylint: disable=import-outside-toplevel
  with _raise_in(engines.PmapEngine, "local_metrics", ZeroDivisionError("a library bug")):
    with pytest.raises(ZeroDivisionError, match="a library bug"):
      train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))


# Command lines on mock data, in a subprocess (as users run them): MOCK_DATA_CLI (conftest).
def _cli(args, timeout=120, env=None):
  argv = [sys.executable, "-c", MOCK_DATA_CLI, args[0]]
  if args[0] == "fastadv_jax.main":
    argv += [f"--config={ROOT}/configs/default.py"] + TINY_CLI
  return subprocess.run(argv + args[1:], capture_output=True, text=True, cwd=ROOT,
                        timeout=timeout,
                        env={**os.environ, "JAX_NUM_CPU_DEVICES": "1", **(env or {})})


def _last_line(text):
  lines = [ln for ln in text.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def _snapshot(path):
  p = pathlib.Path(path)
  if not p.exists():
    return None
  if p.is_file():
    return p.read_bytes()
  return sorted((str(q.relative_to(p)), q.stat().st_size, q.stat().st_mtime_ns)
                for q in p.rglob("*"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("finished")
  proc = _cli(["fastadv_jax.main", f"--workdir={wd}"], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return wd


@contextlib.contextmanager
def _read_only(d):
  """Makes folder d unwritable (as root: the immutable attribute; chmod does not stop root)."""
  as_root = os.geteuid() == 0 and shutil.which("chattr")
  if as_root:
    subprocess.run(["chattr", "+i", str(d)], check=False)
  else:
    d.chmod(0o555)
  try:
    try:
      (d / "probe").write_text("x")
      pytest.skip("cannot make a read-only folder here")
    except OSError:
      pass
    yield d
  finally:
    if as_root:
      subprocess.run(["chattr", "-i", str(d)], check=False, capture_output=True)
    else:
      d.chmod(0o755)


def _assert_one_line_error(proc, needle):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  line = _last_line(proc.stderr)
  assert line.startswith("error: ") and needle in line, line


@pytest.mark.parametrize("args,names", [
    (["--config.foo=1"], "--config.foo"),
    (["--config=configs/nope.py"], "--config"),
    (["--config.seed=-1"], "config.seed"),
    (["--config.batch_size=100000"], "config.batch_size"),
    (["--config.eps=2.0"], "config.eps"),
    (["--config.method=mart"], "config.method"),
])
def test_bad_training_input_is_one_line_and_touches_nothing(args, names, tmp_path):
  wd = tmp_path / "wd"
  _assert_one_line_error(_cli(["fastadv_jax.main", f"--workdir={wd}"] + args), names)
  assert not wd.exists()


def test_unusable_workdirs_are_one_line(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("not a folder")
  (tmp_path / "ro").mkdir()
  with _read_only(tmp_path / "ro") as ro:
    for wd, pattern in ((a_file, "is not a folder"), (ro, "is not writable")):
      _assert_one_line_error(_cli(["fastadv_jax.main", f"--workdir={wd}"]), pattern)
    assert a_file.read_text() == "not a folder" and not any(ro.iterdir())


@pytest.mark.parametrize("args,name", [
    (["--pgd_restarts=0"], "--pgd_restarts"),
    (["--pgd_steps=0"], "--pgd_steps"),
    (["--eps=-1"], "--eps"),
    (["--eps=5"], "--eps"),
    (["--n_eval=0"], "--n_eval"),
    (["--attack=autoattak"], "--attack"),
    (["--attack=autoattack", "--eps=0"], "--eps"),
])
def test_bad_evaluation_input_is_one_line_before_any_work(args, name, finished_run):
  before = _snapshot(finished_run)
  _assert_one_line_error(_cli(["fastadv_jax.evaluate", f"--workdir={finished_run}"] + args), name)
  assert _snapshot(finished_run) == before


def test_evaluate_without_checkpoints_or_on_a_read_only_workdir(tmp_path, finished_run):
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(finished_run / "config.json", empty / "config.json")
  _assert_one_line_error(_cli(["fastadv_jax.evaluate", f"--workdir={empty}"]), "no checkpoint")
  assert sorted(p.name for p in empty.iterdir()) == ["config.json"]
  shutil.copytree(finished_run, tmp_path / "ro_run")
  with _read_only(tmp_path / "ro_run") as ro:
    _assert_one_line_error(_cli(["fastadv_jax.evaluate", f"--workdir={ro}", "--pgd_steps=2",
                                 "--pgd_restarts=1"]), "not writable")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_exits_with_the_shell_code(sig, code, tmp_path):
  wd = tmp_path / "wd"
  argv = [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
          f"--config={ROOT}/configs/default.py",
          f"--workdir={wd}"] + TINY_CLI + ["--config.num_epochs=1000",
                                           "--config.checkpoint_every=1000"]
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
  metrics = wd / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
    time.sleep(0.5)  # training has started (the first metrics were logged)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == code, err[-2000:]
  assert "Traceback" not in err and f"interrupted ({sig.name})" in _last_line(err)
  step = checkpointing.Checkpointer(str(wd)).latest_step()
  assert step is not None and step > 0


def test_kill_9_then_resume_equals_an_uninterrupted_cli_run(tmp_path):
  """A real SIGKILL (nothing runs on the way out) after the first checkpoint, then the same
  command again: results.json and metrics.jsonl equal those of an uninterrupted run."""
  args = ["--config.num_epochs=40", "--config.checkpoint_every=20", "--config.log_every=10",
          "--config.eval_every=40"]
  full = tmp_path / "full"
  assert _cli(["fastadv_jax.main", f"--workdir={full}"] + args, timeout=300).returncode == 0
  cut = tmp_path / "cut"
  argv = [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
          f"--config={ROOT}/configs/default.py",
          f"--workdir={cut}"] + TINY_CLI + args
  proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
  deadline = time.time() + 240
  while time.time() < deadline and not (cut / "checksums").is_dir():
    time.sleep(0.2)
  proc.kill()
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not (cut / "results.json").exists()  # it really was cut short
  assert _cli(["fastadv_jax.main", f"--workdir={cut}"] + args, timeout=300).returncode == 0
  strip = lambda d: {k: v for k, v in json.loads((d / "results.json").read_text()).items()  # noqa
                     if k not in VOLATILE + ("step_time_s",)}
  assert strip(cut) == strip(full)
  assert _metrics(cut) == _metrics(full)


def test_a_shard_map_run_resumes_on_another_device_count(tmp_path):
  """Checkpointed mid-run on 2 devices (global arrays), resumed on 1: the checkpoint's arrays
  are read onto the new mesh, and the run finishes (the numbers match the 2-device run's only
  up to float rounding, so they are not compared here)."""
  wd = tmp_path / "wd"
  shard = ["--config.parallelism=shard_map", "--config.checkpoint_every=2"]
  first = _cli(["fastadv_jax.main", f"--workdir={wd}"] + shard, env={"JAX_NUM_CPU_DEVICES": "2"})
  assert first.returncode == 0, first.stderr[-3000:]
  (wd / "results.json").unlink()  # back to iteration 2 of 3: the last checkpoint removed
  shutil.rmtree(wd / "checkpoints" / "3")
  (wd / "checksums" / "3.json").unlink()
  again = _cli(["fastadv_jax.main", f"--workdir={wd}"] + shard, env={"JAX_NUM_CPU_DEVICES": "1"})
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed from checkpoint at iteration 2" in again.stderr
  assert "1 device(s) in 1 process(es)" in again.stderr
  assert json.loads((wd / "results.json").read_text())["iterations"] == 3
