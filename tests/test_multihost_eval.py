"""Evaluation over several processes: `fastadv_jax.evaluate` (PGD and the standard AutoAttack)
with 2 processes x 4 CPU devices gives the per-point verdicts, numbers, robust counts and
warnings of 1 process x 8, and only process 0 prints and writes; and, in one process, the pieces
that make the split invisible (records from per-point verdicts, the points the sanity checks
look at, PGD's per-point verdicts)."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI, start_processes, wait_processes
from test_attacks import _model_and_loss
from test_multihost import _free_port
from fastadv_jax import autoattack
from fastadv_jax.autoattack import runner
from fastadv_jax.training import evaluation

# eps 0.01 on the tiny run: of its 20 points some are clean, some of those survive APGD-CE and
# go on to the later attacks (found by running it; the test checks it still holds).
_EVAL = ["--attack=pgd,autoattack", "--n_eval=20", "--pgd_steps=2", "--pgd_restarts=1",
         "--eps=0.01"]


def _command(module: str, args: list, n_proc: int, devices: int, watch: tuple = ()) -> list:
  """`module`'s command line in n_proc processes of `devices` CPU devices each, on mock data;
  each process's (stdout, stderr), after checking that all succeeded."""
  port = _free_port()
  argvs = []
  for i in range(n_proc):
    dist = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n_proc}",
             f"--process_id={i}"] if n_proc > 1 else [])
    argvs.append([sys.executable, "-c", MOCK_DATA_CLI, module] + args + dist)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))
  done = wait_processes(start_processes(argvs, [env] * n_proc), watch=watch)
  for code, _, err in done:
    assert code == 0, err[-3000:]
  return [(out, err) for _, out, err in done]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A finished tiny training run (1 process x 8 devices, 3 iterations, eval batch 16)."""
  wd = tmp_path_factory.mktemp("run") / "wd"
  _command("fastadv_jax.main", [f"--config={ROOT}/configs/default.py", f"--workdir={wd}"]
           + TINY_CLI, 1, 8, watch=(wd.parent,))
  return wd


def _evaluate(run, tmp_path, name: str, n_proc: int, devices: int):
  """The evaluation of a copy of `run`: (JSON, per-point arrays, each process's (stdout,
  stderr))."""
  wd = tmp_path / name
  shutil.copytree(run, wd)
  before = set(os.listdir(wd))
  outs = _command("fastadv_jax.evaluate", [f"--workdir={wd}"] + _EVAL, n_proc, devices,
                  watch=(wd,))
  written = sorted(set(os.listdir(wd)) - before)
  assert [os.path.splitext(f)[1] for f in written] == [".json", ".npz"], written
  assert written[0][:-5] == written[1][:-4]  # the same name
  with np.load(wd / written[1]) as f:
    points = dict(f)
  return json.loads((wd / written[0]).read_text()), points, outs


def test_two_processes_evaluate_as_one(tiny_run, tmp_path):
  one, one_pts, one_out = _evaluate(tiny_run, tmp_path, "one", 1, 8)
  two, two_pts, two_out = _evaluate(tiny_run, tmp_path, "two", 2, 4)
  # The case exercises the split: clean points on both processes' shares (0..9, 10..19) and
  # at least one that the first attack leaves to the others.
  clean = one_pts["clean"]
  assert clean[:10].any() and clean[10:].any(), clean
  assert one["autoattack_robust_counts"]["apgd-ce"] > 0
  assert sorted(one_pts) == sorted(two_pts) == [
      "autoattack_broken_by", "autoattack_robust", "clean", "pgd_robust"]
  for k, v in one_pts.items():
    assert v.shape == (20,), k
    np.testing.assert_array_equal(two_pts[k], v, err_msg=k)
  for k in ("clean_acc", "pgd_acc", "autoattack_acc", "autoattack_clean_acc", "n_eval",
            "autoattack_n", "autoattack_attacks", "autoattack_robust_counts",
            "autoattack_warnings"):
    assert two[k] == one[k], k
  assert one["clean_acc"] == np.mean(clean) and one["pgd_acc"] == np.mean(one_pts["pgd_robust"])
  assert one["autoattack_acc"] == np.mean(one_pts["autoattack_robust"])
  # Timing: process 0's own seconds, and every process's.
  attacks = one["autoattack_attacks"]
  for res, n_proc in ((one, 1), (two, 2)):
    per = res["autoattack_seconds_per_process"]
    assert list(per) == attacks and all(len(per[a]) == n_proc for a in attacks)
    assert all(per[a][0] == res["autoattack_seconds"][a] for a in attacks)
  # Each process attacked its own share of the points.
  for p, (lo, hi) in enumerate(((0, 9), (10, 19))):
    assert re.search(rf"autoattack apgd-ce: \d+ -> \d+ robust of 10 on process {p} "
                     rf"\(points {lo}\.\.{hi} of 20\)", two_out[p][1]), two_out[p][1][-3000:]
  # Only process 0 prints the result (gloo prints its connection lines on stdout first).
  assert _printed(two_out[0][0]) == two and _printed(one_out[0][0]) == one
  assert "{" not in two_out[1][0]


def _printed(stdout: str) -> dict:
  """The JSON a process printed: from its line "{" on."""
  lines = stdout.splitlines()
  return json.loads("\n".join(lines[lines.index("{"):]))


def test_bad_distributed_flags_are_one_line_errors(tiny_run):
  """evaluate refuses what distributed.initialize refuses, as one line, before any work."""
  before = sorted(os.listdir(tiny_run))
  for flags, needle in (
      (["--num_processes=2"], "need --coordinator_address"),
      (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=0",
        "--distributed_timeout=0"], "--distributed_timeout: must be > 0")):
    proc = subprocess.run(
        [sys.executable, "-m", "fastadv_jax.evaluate", f"--workdir={tiny_run}"] + flags,
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert proc.stdout.splitlines() == [proc.stdout.strip()], proc.stdout[-3000:]
    assert proc.stdout.startswith("error: ") and needle in proc.stdout, proc.stdout
  assert sorted(os.listdir(tiny_run)) == before


def test_records_follow_from_the_per_point_verdicts():
  """attack_records on per-point verdicts = the counts of running the attacks one after the
  other (each on the points still robust)."""
  rng = np.random.default_rng(0)
  attacks = ("a", "b", "c")
  clean = rng.random(50) < 0.7
  broken_by = np.where(clean, rng.integers(-1, 3, 50), -1)
  robust, want = clean.copy(), []
  for a in range(len(attacks)):
    attacked = int(robust.sum())
    robust &= broken_by != a
    want.append((attacked, int(robust.sum())))
  got = runner.attack_records(attacks, clean, broken_by, [1.0, 2.0, 3.0],
                              np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
  assert [(r.attacked, r.robust_after) for r in got] == want
  assert [r.seconds for r in got] == [1.0, 2.0, 3.0]
  assert [r.process_seconds for r in got] == [(1.0, 4.0), (2.0, 5.0), (3.0, 6.0)]
  single = runner.attack_records(attacks, clean, broken_by, [1.0, 2.0, 3.0])
  assert [r.process_seconds for r in single] == [(1.0,), (2.0,), (3.0,)]


def test_a_runs_records_match_its_per_point_verdicts():
  w = np.random.default_rng(1).normal(size=(36, 5)).astype(np.float32)
  x = np.random.default_rng(2).uniform(size=(24, 6, 6, 1)).astype(np.float32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
  y = np.asarray(np.argmax(logits_fn(x), -1))
  y[:4] = (y[:4] + 1) % 5  # some points misclassified without attack
  res = autoattack.evaluate(logits_fn, x, y, 0.03, "apgd-ce,square", progress=False,
                            square_queries=50, batch_size=8)
  robust = res.clean.copy()
  for a, record in enumerate(res.records):
    assert record.attacked == robust.sum()
    robust &= res.broken_by != a
    assert record.robust_after == robust.sum()
  np.testing.assert_array_equal(robust, res.robust)
  assert 0 < res.robust.sum() < res.clean.sum() < 24  # the case has every outcome
  assert res.summary()["autoattack_seconds_per_process"] == {
      r.name: [round(r.seconds, 3)] for r in res.records}


def test_the_checks_look_at_the_same_points_on_any_process_split(monkeypatch):
  """The reference's checks look at the first chunk of one process with all the devices: 4
  devices in each of 2 processes check what 8 devices in 1 process do."""
  make = lambda devices: autoattack.AutoAttack(  # noqa: E731
      lambda _, z, key: z.reshape(z.shape[0], -1)[:, :5], 5, 0.03, "apgd-ce",
      batch_size=16, devices=jax.local_devices()[:devices], progress=False)
  eight = make(8)
  want = [eight.device.checked_points(n) for n in (5, 20, 37, 100)]
  assert want[1] == 16 and want[3] < 100  # several chunks: the checks see the first only
  four = make(4)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert [four.device.checked_points(n) for n in (5, 20, 37, 100)] == want


def test_pgd_per_point_verdicts():
  model, v, x, y, _ = _model_and_loss()
  xu, y = np.asarray(x * 255, np.uint8), np.asarray(y)
  ev = evaluation.Evaluator(model, batch_size=8)
  rng = jax.random.key(5)
  robust = ev.robust_points(v, xu, y, 0.05, 3, 2, rng)
  assert robust.shape == (16,) and robust.dtype == bool
  assert 0 < robust.sum() < 16
  assert not np.any(robust & ~ev.clean_points(v, xu, y))
  assert ev.robust_accuracy(v, xu, y, 0.05, 3, 2, rng) == np.mean(robust)
  assert ev.clean_accuracy(v, xu, y) == np.mean(ev.clean_points(v, xu, y))
