"""The command lines' persistent compilation cache (compilation_cache.py): a second invocation
loads its programs from the folder, a damaged folder changes nothing but the time (one line),
and an unwritable one turns the cache off with one line."""
import json
import os
import subprocess
import sys

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI
from fastadv_jax.runtime import compilation_cache

VOLATILE = ("train_time_s", "wall_time_s", "step_time_s")


def _train(wd, cache, extra=()):
  # XLA's default convolutions: jaxlib cannot serialise programs that call oneDNN (the library's
  # CPU flags), and the training step is to be among the entries.
  env = dict(os.environ, FASTADV_COMPILATION_CACHE=str(cache), JAX_NUM_CPU_DEVICES="1",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", FASTADV_XLA_CPU_FLAGS="0",
             XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
                         f"--config={ROOT}/configs/default.py", f"--workdir={wd}"] + TINY_CLI
                        + list(extra), cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((wd / "results.json").read_text())
  return {k: v for k, v in r.items() if k not in VOLATILE}, proc.stderr


def _entries(cache):
  return sorted(n for n in os.listdir(cache) if n.endswith("-cache"))


def test_a_damaged_cache_changes_nothing_but_the_time(tmp_path):
  cache = tmp_path / "cache"
  first, _ = _train(tmp_path / "a", cache)
  entries = _entries(cache)
  assert any(n.startswith("jit__fun-") for n in entries), entries  # pmap's programs (the step)
  for name in entries:  # every entry overwritten with garbage
    (cache / name).write_bytes(b"not an executable")
  second, err = _train(tmp_path / "b", cache)
  assert second == first
  notes = [ln for ln in err.splitlines() if "compilation cache" in ln]
  assert len(notes) == 1 and notes[0].startswith(f"warning: compilation cache {cache}: Error "
                                                 "reading"), notes
  third, err = _train(tmp_path / "c", cache)  # rewritten by the second run: read back, silent
  assert third == first and "compilation cache" not in err


def test_an_unwritable_cache_folder_turns_the_cache_off_with_one_line(tmp_path, capsys):
  blocked = tmp_path / "file"
  blocked.write_text("a file, not a folder")
  assert compilation_cache.enable({compilation_cache.ENV: str(blocked / "xla")}) is None
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("warning: compilation cache off: cannot write")


def test_the_folder_follows_the_variable():
  assert compilation_cache.folder({"FASTADV_COMPILATION_CACHE": "0"}) is None
  assert compilation_cache.folder({"FASTADV_COMPILATION_CACHE": "off"}) is None
  assert compilation_cache.folder({"FASTADV_COMPILATION_CACHE": "/x/y"}) == "/x/y"
  assert compilation_cache.folder({"XDG_CACHE_HOME": "/c"}) == "/c/fastadv_jax/xla"
