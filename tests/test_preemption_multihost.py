"""Pre-emption of a multi-process run (preemption.py) and its resume (checkpointing.py): a real
SIGTERM or SIGINT to ONE of 2 processes x 4 CPU devices stops both after the same iteration,
with the same checkpoint and exit code; the relaunched command ends as an uninterrupted run
does; a corrupt latest checkpoint is moved aside once, by process 0, and both resume from the
previous one; when process 0 refuses the checkpoints, the other process refuses too.

Subprocess tests of the training command line on mock data (MOCK_DATA_CLI), like
tests/test_multihost.py; each process's stderr goes to a file of the test's folder."""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI, kill_processes, wait_processes
from fastadv_jax.training import checkpointing, metric_writers

# 36 iterations (3 per epoch), a metrics row every 3, checkpoints at 9, 18, ... (the last two
# kept), diagnostics only at the end: long enough to be signalled mid-training.
TOTAL, FIRST_CHECKPOINT = 36, 9
_ARGS = TINY_CLI + ["--config.num_epochs=12", "--config.log_every=3",
                    f"--config.checkpoint_every={FIRST_CHECKPOINT}", f"--config.eval_every={TOTAL}"]
VOLATILE = ("train_time_s", "wall_time_s", "step_time_s")
_STOP = re.compile(r"Stopping after iteration (\d+)")


def _start(workdir: pathlib.Path, logs: pathlib.Path) -> list:
  """The training command in 2 processes of 4 CPU devices; stderr to logs/<launch>-<i>.txt."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  logs.mkdir(parents=True, exist_ok=True)
  launch = len(list(logs.glob("*-0.txt")))
  procs = []
  for i in range(2):
    argv = [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
            f"--config={ROOT}/configs/default.py", f"--workdir={workdir}"] + _ARGS + [
                f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                f"--process_id={i}"]
    err = open(logs / f"{launch}-{i}.txt", "w+")  # pylint: disable=consider-using-with
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True,
                            env=dict(os.environ, JAX_NUM_CPU_DEVICES="4"),
                            start_new_session=True)
    proc.log, proc.out, proc.err, proc.workdir = logs / f"{launch}-{i}.txt", err, err, workdir
    procs.append(proc)
  return procs


def _wait(procs: list) -> tuple[list[int], list[str]]:
  """Exit codes and stderr of the processes once both have ended (conftest.wait_processes:
  as long as they make progress; killed otherwise)."""
  try:
    wait_processes(procs, watch=(procs[0].workdir,))
  finally:
    kill_processes(procs)
    for p in procs:
      p.err.close()
  return [p.returncode for p in procs], [p.log.read_text() for p in procs]


def _until(ready, procs: list) -> None:
  """Waits until ready() (training got that far), failing early if a process ended or stopped
  making progress (both are then killed)."""
  wait_processes(procs, watch=(procs[0].workdir,), ready=ready)


def _rows(wd: pathlib.Path) -> int:
  path = wd / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def _results(wd: pathlib.Path) -> dict:
  r = json.loads((wd / "results.json").read_text())
  return {k: v for k, v in r.items() if k not in VOLATILE}


def _metrics(wd: pathlib.Path) -> list[dict]:
  return [{k: v for k, v in row.items() if "time" not in k}
          for row in metric_writers.read_metrics(str(wd))]


def _latest_step(wd: pathlib.Path) -> int | None:
  ckpt = checkpointing.Checkpointer(str(wd), read_only=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _last_line(text: str) -> str:
  lines = [ln for ln in text.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def _stopped_together(codes, errs, code, sig_name) -> int:
  """Both processes exited with `code` after the same logged iteration; returns it."""
  assert codes == [code, code], "\n".join(e[-2000:] for e in errs)
  stops = [_STOP.findall(e) for e in errs]
  assert len(stops[0]) == 1 and stops[0] == stops[1], stops
  assert all(f"interrupted ({sig_name})" in _last_line(e) for e in errs)
  assert all("Traceback" not in e for e in errs)
  return int(stops[0][0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted 2-process run: its results.json and metrics.jsonl, times left out."""
  wd = tmp_path_factory.mktemp("reference")
  codes, errs = _wait(_start(wd / "wd", wd / "logs"))
  assert codes == [0, 0], "\n".join(e[-2000:] for e in errs)
  return _results(wd / "wd"), _metrics(wd / "wd")


def test_sigterm_to_one_process_stops_both_then_the_relaunch_equals_an_uninterrupted_run(
    tmp_path, reference):
  wd, logs = tmp_path / "wd", tmp_path / "logs"
  procs = _start(wd, logs)
  _until(lambda: _rows(wd) >= 1, procs)  # training is under way (the first metrics row)
  os.kill(procs[1].pid, signal.SIGTERM)  # process 1 alone: it writes no checkpoint itself
  codes, errs = _wait(procs)
  step = _stopped_together(codes, errs, 143, "SIGTERM")
  assert "SIGTERM received" in errs[1] and "SIGTERM received" not in errs[0]
  assert 0 < step < TOTAL and not (wd / "results.json").exists()  # stopped mid-training
  assert _latest_step(wd) == step  # the iteration both stopped after is the one saved
  codes, errs = _wait(_start(wd, logs))  # the same command again, on both
  assert codes == [0, 0], "\n".join(e[-2000:] for e in errs)
  assert all(f"Resumed from checkpoint at iteration {step}\n" in e for e in errs)
  results, metrics = reference
  assert _results(wd) == results
  assert _metrics(wd) == metrics


@pytest.fixture(scope="module")
def stopped_by_sigint(tmp_path_factory):
  """A 2-process run that process 0 got SIGINT in, after the first regular checkpoint, so that
  two checkpoints are kept: (workdir, exit codes, stderrs)."""
  root = tmp_path_factory.mktemp("sigint")
  wd = root / "wd"
  procs = _start(wd, root / "logs")
  _until(lambda: (wd / "checksums" / f"{FIRST_CHECKPOINT}.json").exists(), procs)
  os.kill(procs[0].pid, signal.SIGINT)
  codes, errs = _wait(procs)
  return wd, codes, errs


def test_sigint_to_one_process_stops_both_with_130(stopped_by_sigint):
  wd, codes, errs = stopped_by_sigint
  step = _stopped_together(codes, errs, 130, "SIGINT")
  assert FIRST_CHECKPOINT < step < TOTAL
  assert _latest_step(wd) == step


def _garble(step_dir: pathlib.Path) -> None:
  """Flips bytes in the middle of the checkpoint's largest state file (size unchanged)."""
  big = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size)
  data = bytearray(big.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
  big.write_bytes(bytes(data))


def _copy_with_garbled(stopped: pathlib.Path, to: pathlib.Path, n: int) -> list[int]:
  """A copy of the stopped run's workdir whose n newest checkpoints are garbled; all steps."""
  shutil.copytree(stopped, to)
  steps = sorted(int(p.name) for p in (to / "checkpoints").iterdir() if p.name.isdigit())
  for s in steps[-n:]:
    _garble(to / "checkpoints" / str(s))
  return steps


def test_a_corrupt_checkpoint_is_moved_aside_once_and_both_resume_from_the_previous(
    tmp_path, stopped_by_sigint, reference):
  wd = tmp_path / "wd"
  steps = _copy_with_garbled(stopped_by_sigint[0], wd, 1)
  assert len(steps) == 2
  codes, errs = _wait(_start(wd, tmp_path / "logs"))
  assert codes == [0, 0], "\n".join(e[-2000:] for e in errs)
  moved = list((wd / "corrupt_checkpoints").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith(f"{steps[1]}-")
  assert "differ from their checksums" in errs[0]  # process 0 checked and moved it...
  assert "differ from their checksums" not in errs[1]  # ... process 1 did not, and restored
  assert f"Restoring checkpoint {steps[0]}, the one process 0 checked" in errs[1]  # its choice
  assert all(f"Resumed from checkpoint at iteration {steps[0]}\n" in e for e in errs)
  results, metrics = reference
  assert _results(wd) == results
  assert _metrics(wd) == metrics


def test_when_process_0_refuses_the_checkpoints_the_other_refuses_too(tmp_path,
                                                                      stopped_by_sigint):
  wd = tmp_path / "wd"
  _copy_with_garbled(stopped_by_sigint[0], wd, 2)  # no intact checkpoint left
  codes, errs = _wait(_start(wd, tmp_path / "logs"))
  assert codes == [2, 2], "\n".join(e[-2000:] for e in errs)
  assert _last_line(errs[0]).startswith("error: no intact checkpoint left")
  assert _last_line(errs[1]).startswith("error: process 0 refused the checkpoints")
  assert len(list((wd / "corrupt_checkpoints").iterdir())) == 2
  assert not (wd / "results.json").exists()
