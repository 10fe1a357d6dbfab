"""Several processes as one run (jax.distributed, gloo collectives over 127.0.0.1): 2 processes
x 4 CPU devices train to the same parameters (within float32 rounding) and write the same outputs
as 1 process x 8.

What this does and does not show: data, augmentation and noise are identical across topologies,
and a few steps agree to rounding, but the cross-device sums add in another order, so over a
whole run the rounding grows like a change of seed (the default config for one epoch ended at
clean 0.770 / PGD 0.594 on 2 x 4 and 0.764 / 0.580 on 1 x 8). docs/devices.md says so."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import (MOCK_DATA_CLI, ROOT, TINY_CLI, kill_processes, start_processes,
                      wait_processes)
from fastadv_jax.runtime import distributed

_TINY = TINY_CLI + ["--config.num_epochs=2", "--config.log_every=2", "--config.eval_every=3",
                    "--config.checkpoint_every=3", "--config.n_final_eval=20",
                    "--config.eval_batch_size=8"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(workdir, n_proc: int, devices: int, extra=()):
  """The training command line in n_proc processes of `devices` CPU devices each."""
  port = _free_port()
  argvs = []
  for i in range(n_proc):
    dist = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n_proc}",
             f"--process_id={i}"] if n_proc > 1 else [])
    argvs.append([sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
                  f"--config={ROOT}/configs/default.py",
                  f"--workdir={workdir}"] + _TINY + list(extra) + dist)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
  for code, out, err in wait_processes(start_processes(argvs, [env] * n_proc), watch=(workdir,)):
    assert code == 0, err[-3000:]
    assert "[Gloo]" not in out + err  # gloo's connection lines only with FASTADV_VERBOSE=1


def _params(workdir):
  from fastadv_jax.training import saved_run
  _, v, step = saved_run.load_run(str(workdir))
  return v, step


def _files(workdir):
  """The output files (TensorBoard's event files named by kind, not host and time)."""
  out = []
  for p in pathlib.Path(workdir).rglob("*"):
    if p.is_file() and "checkpoints" not in p.parts:
      rel = p.relative_to(workdir)
      out.append(f"tensorboard/events ({p.stat().st_size > 0})" if rel.parts[0] == "tensorboard"
                 else str(rel))
  return sorted(out)


@pytest.mark.parametrize("extra", [
    # Free-AT: the perturbation it carries between steps is split over processes like the batch
    # and gathered for checkpoints, on top of everything FGSM-style methods exercise.
    ["--config.method=free"],
    # FGSM-PGI: per-example buffers keyed by training-set position, in blocks of rows over the
    # devices of both processes; with weight averaging on.
    ["--config.method=fgsm_pgi", "--config.grad_align_lambda=0", "--config.ema_decay=0.5"],
    # The same under jit + shard_map: global arrays over both processes' devices, each process
    # feeding its rows, Orbax writing and reading each process's shards of the checkpoint.
    ["--config.method=fgsm_pgi", "--config.grad_align_lambda=0", "--config.ema_decay=0.5",
     "--config.parallelism=shard_map"],
], ids=["free", "fgsm_pgi_ema", "fgsm_pgi_ema_shard_map"])
def test_two_processes_equal_one(tmp_path, extra):
  _train(tmp_path / "one", 1, 8, extra)
  _train(tmp_path / "two", 2, 4, extra)
  one = json.loads((tmp_path / "one" / "results.json").read_text())
  two = json.loads((tmp_path / "two" / "results.json").read_text())
  for k in ("clean_acc", "pgd_acc", "n_eval", "iterations"):
    assert two[k] == pytest.approx(one[k], abs=1e-6), k
  assert ("averaged" in one) == ("averaged" in two) == ("--config.ema_decay=0.5" in extra)
  for k in ("clean_acc", "pgd_acc") if "averaged" in one else ():
    assert two["averaged"][k] == pytest.approx(one["averaged"][k], abs=1e-6), k
  for k, v in one["final_train_metrics"].items():
    assert two["final_train_metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
  rows = lambda d: [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]  # noqa
  assert [r["step"] for r in rows(tmp_path / "two")] == [r["step"] for r in rows(tmp_path / "one")]
  assert _files(tmp_path / "two") == _files(tmp_path / "one")  # one set of outputs, not two
  (v1, s1), (v2, s2) = _params(tmp_path / "one"), _params(tmp_path / "two")
  assert s1 == s2 == one["iterations"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5), v1, v2)
  # Rerunning the finished command: both processes restore process 0's last checkpoint.
  (tmp_path / "two" / "results.json").unlink()
  _train(tmp_path / "two", 2, 4, extra)
  again = json.loads((tmp_path / "two" / "results.json").read_text())
  assert (again["clean_acc"], again["pgd_acc"]) == (two["clean_acc"], two["pgd_acc"])


def _two_process_argvs(workdir, extra=()) -> list[list[str]]:
  port = _free_port()
  return [[sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
           f"--config={ROOT}/configs/default.py", f"--workdir={workdir}"] + _TINY + list(extra)
          + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
          for i in range(2)]


def test_a_launch_without_a_first_step_ends_every_process(tmp_path):
  """The first-step watchdog: 1 s is too short for the data and the first compilation, so it
  fires in both processes, which end with one line each, exit 2, the workdir's checkpoints
  untouched (none was written)."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", FASTADV_FIRST_STEP_TIMEOUT="1")
  procs = start_processes(_two_process_argvs(tmp_path / "wd"), [env, env])
  for code, _, err in wait_processes(procs, watch=(tmp_path,)):
    assert code == 2, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(
        "error: no training step completed within 1 s after the processes connected"), err
  assert not (tmp_path / "wd" / "checkpoints").exists() or not any(
      (tmp_path / "wd" / "checkpoints").iterdir())


def test_sigterm_ends_a_process_that_waits_to_connect(tmp_path):
  """Process 0 of 2 alone waits in the connect; SIGTERM ends it (JAX's pre-emption service,
  which would catch and ignore it, is off)."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2")
  argv = _two_process_argvs(tmp_path / "wd")[0]
  port = int(next(a for a in argv if a.startswith("--coordinator_address")).rsplit(":", 1)[1])
  procs = start_processes([argv], [env])

  def listening() -> bool:  # process 0 serves the coordinator: it is inside the connect
    with socket.socket() as s:
      return s.connect_ex(("127.0.0.1", port)) == 0

  try:
    wait_processes(procs, ready=listening)
    time.sleep(1)
    procs[0].send_signal(signal.SIGTERM)
    (code, _, _), = wait_processes(procs, stall_s=60)
  finally:
    kill_processes(procs)
  assert code == -signal.SIGTERM


def test_a_jaxlib_whose_multiprocess_runs_hang_is_refused(monkeypatch):
  import jaxlib  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jaxlib, "__version__", distributed.BROKEN_MULTIPROCESS_JAXLIB[0])
  with pytest.raises(distributed.DistributedError, match=r"jaxlib 0\.12\.1 hangs in multi-process"):
    distributed.initialize("off", "127.0.0.1:1234", 2, 0, environ={})


def test_bad_distributed_arguments_are_refused():
  with pytest.raises(distributed.DistributedError, match="need --coordinator_address"):
    distributed.initialize("off", None, 2, 1, environ={})
  with pytest.raises(distributed.DistributedError, match="needs --num_processes"):
    distributed.initialize("off", "127.0.0.1:1234", None, None, environ={})
  with pytest.raises(distributed.DistributedError, match="--process_id: must be in"):
    distributed.initialize("off", "127.0.0.1:1234", 2, 2, environ={})
  with pytest.raises(distributed.DistributedError, match="must be host:port, got '127.0.0.1'"):
    distributed.initialize("off", "127.0.0.1", 2, 0, environ={})
  with pytest.raises(distributed.DistributedError, match="FASTADV_NUM_PROCESSES: must be an"):
    distributed.initialize("off", "127.0.0.1:1234", environ={
        "FASTADV_NUM_PROCESSES": "two", "FASTADV_PROCESS_ID": "0"})
  with pytest.raises(distributed.DistributedError, match="FASTADV_FIRST_STEP_TIMEOUT: must be"):
    distributed.initialize("off", "127.0.0.1:1234", 2, 0, environ={
        "FASTADV_FIRST_STEP_TIMEOUT": "soon"})
  assert distributed.initialize("off", environ={}) is False  # a single process: nothing to do


def test_points_are_split_without_gaps():
  for n, p in ((20, 2), (9, 4), (1000, 3)):
    ranges = [distributed.point_range(n, i, p) for i in range(p)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(b - a in (n // p, n // p + 1) for a, b in ranges)
  with pytest.raises(ValueError, match="cannot be split"):
    distributed.point_range(3, 0, 4)


def test_gloo_lines_are_dropped_until_the_process_ends():
  """cli_logging.drop_gloo_lines: Gloo's lines never reach the output, even one written while
  the process exits (JAX shuts down after the output is passed on) or cut in two by a slow
  writer; every other line, and a last line without its newline, reach it whole and once."""
  code = "\n".join([
      "import atexit, os, sys, time",
      "atexit.register(lambda: (os.write(1, b'[Gloo] Rank 0 is connected (at exit)\\n'),",
      "                         time.sleep(0.2)))  # runs after drop_gloo_lines' own handler",
      "from fastadv_jax.runtime import cli_logging",
      "cli_logging.drop_gloo_lines()",
      "print('kept 1', flush=True)",
      "os.write(1, b'[Gloo] Rank 1 is connected to 1 peer')",
      "time.sleep(0.2)",
      "os.write(1, b' ranks\\n')",
      "print('kept 2')",
      "sys.stdout.write('last, no newline')",
  ])
  env = {k: v for k, v in os.environ.items() if k != "FASTADV_VERBOSE"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60,
                       check=True).stdout
  assert out == b"kept 1\nkept 2\nlast, no newline"
