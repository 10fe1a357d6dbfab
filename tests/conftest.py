"""Test set-up: 8 simulated CPU devices (multi-device tests), quiet TensorFlow, shared helpers."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache per suite run for the command lines the tests start as
# subprocesses (the xdist workers inherit the controller's environment, the subprocesses the
# workers'): the many fresh processes that run the same small programs compile each once. The
# test processes themselves keep JAX's in-memory caches only: a long-lived worker that also
# serialised every program it compiled ran out of memory mappings (std::bad_alloc while writing
# entries, then a crash). Set FASTADV_COMPILATION_CACHE=0 to run the suite without it.
if "PYTEST_XDIST_WORKER" not in os.environ and "FASTADV_COMPILATION_CACHE" not in os.environ:
  _SUITE_CACHE = tempfile.mkdtemp(prefix="fastadv-suite-xla-cache-")
  os.environ["FASTADV_COMPILATION_CACHE"] = _SUITE_CACHE
  # Every program, however fast it compiles: the tests' tiny models compile in under 0.1 s each,
  # but a command line compiles hundreds of them.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
else:
  _SUITE_CACHE = None

from fastadv_jax.runtime import xla_cpu  # noqa: E402

xla_cpu.apply()  # tests run with the XLA flags users run with

import compile_memo  # noqa: E402  (tests/ is on sys.path: the rootdir's conftest)

# A test process compiles each distinct program once (tests/compile_memo.py says why and how).
compile_memo.install()

import importlib  # noqa: E402
import pathlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]

# `python -c MOCK_DATA_CLI <module> <flags...>` runs `<module>.run()` (a command line of the
# package) with TFDS's mock data in place of the real datasets, in a fresh process; quiet at
# start-up as the command lines are (cli_logging.quiet_startup, before TensorFlow loads).
#
# It runs the command under XLA's default CPU pipeline (the library's opt-out, and the CNN flags
# the test process passed on through XLA_FLAGS taken out): jaxlib does not serialise programs
# that call oneDNN (the CNNs' flags), so only then can the suite's compilation cache above store
# the command's programs, and the tiny training that many tests start compiles once in the suite
# instead of once per test. The run records the flags it ran with (none). The tests about the
# flags, and the one property that holds under the library's flags only (a shard_map run writes
# what a pmap run writes, bit for bit), set USERS_XLA_FLAGS in the command's environment: the
# command then applies its model's flags as for a user.
USERS_XLA_FLAGS = "FASTADV_TEST_USERS_XLA_FLAGS"
MOCK_DATA_CLI = r"""
import os, sys
from fastadv_jax.runtime import cli_logging, xla_cpu
if not os.environ.get("%s"):
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split()
      if f.lstrip("-").split("=")[0] not in xla_cpu.CNN_FLAGS)
  os.environ[xla_cpu.OPT_OUT] = "0"
cli_logging.quiet_startup()
import tensorflow_datasets as tfds
sys.path.insert(0, "tests")
module = sys.argv[1]
sys.argv = ["prog"] + sys.argv[2:]
with tfds.testing.mock_data(num_examples=48):
  import importlib
  importlib.import_module(module).run()
""" % USERS_XLA_FLAGS

# The default config shrunk for a command-line run on MOCK_DATA_CLI's data: 3 iterations of 16,
# diagnostics and the final PGD on 16 points. A later --config.<field> overrides one of these.
TINY_CLI = ["--config.model_args.small_cnn.n_filters=4", "--config.model_args.cnn.n_filters=4",
            "--config.batch_size=16", "--config.num_epochs=1",
            "--config.n_eval_points=16", "--config.eval_pgd_steps=2", "--config.n_final_eval=16",
            "--config.final_pgd_steps=2", "--config.final_pgd_restarts=1",
            "--config.eval_batch_size=16", "--config.progress_bar=False",
            "--config.data_dir=/nonexistent-use-mock"]


# A command the tests start (a training, several processes of one run) is waited for as long as
# it makes progress: its output grows, or a file under its workdir changes. Only this long
# without either counts as a hang (generous: a loaded machine compiles slowly, and a JAX start-up
# writes nothing for tens of seconds); every process group is killed then, or when the test
# fails, so that no process outlives it.
STALL_S = 300.0


def _progress_mark(outputs: list, watch: tuple) -> tuple:
  sizes = tuple(os.fstat(f.fileno()).st_size for f in outputs)
  files = []
  for root in watch:
    for dirpath, _, names in os.walk(root):
      for name in names:
        try:
          st = os.stat(os.path.join(dirpath, name))
        except OSError:  # removed meanwhile (a checkpoint rotated away)
          continue
        files.append((dirpath, name, st.st_size, st.st_mtime_ns))
  return sizes, tuple(sorted(files))


def start_processes(argvs: list[list[str]], envs: list[dict] | None = None) -> list:
  """Starts the commands (from the repository root), each in a process group of its own, with
  stdout and stderr in temporary files (`.out`, `.err` on each process)."""
  import tempfile as _tempfile  # pylint: disable=import-outside-toplevel
  procs = []
  for i, argv in enumerate(argvs):
    out, err = _tempfile.TemporaryFile("w+"), _tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, cwd=ROOT, env=None if envs is None else envs[i], stdout=out,
                            stderr=err, text=True, start_new_session=True)
    proc.out, proc.err = out, err
    procs.append(proc)
  return procs


def kill_processes(procs: list) -> None:
  """SIGKILL to the process group of every command still running (their children included)."""
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def wait_processes(procs: list, watch: tuple = (), stall_s: float = STALL_S,
                   ready=None) -> list[tuple[int, str, str]]:
  """Waits until every process has ended (or, with `ready`, until ready() is true, all still
  running), as long as they make progress (STALL_S); (returncode, stdout, stderr) of each. On a
  stall, or anything else that ends the wait early, every process group is killed."""
  outputs = [f for p in procs for f in (p.out, p.err)]
  mark, since = _progress_mark(outputs, watch), time.monotonic()
  try:
    while not (ready() if ready else all(p.poll() is not None for p in procs)):
      if ready is not None:
        assert all(p.poll() is None for p in procs), "a process ended before it was ready:\n" + \
            "\n".join(_read(p.err)[-2000:] for p in procs)
      time.sleep(0.2)
      now = _progress_mark(outputs, watch)
      if now != mark:
        mark, since = now, time.monotonic()
      elif time.monotonic() - since > stall_s:
        raise AssertionError(f"no progress for {stall_s:g} s (no output, no file changed): "
                             "killed\n" + "\n".join(_read(p.err)[-2000:] for p in procs))
  except BaseException:
    kill_processes(procs)
    raise
  if ready is not None:
    return []
  return [(p.returncode, _read(p.out), _read(p.err)) for p in procs]


def _read(f) -> str:
  f.seek(0)
  return f.read()


def load_config(name: str = "default", arg: str | None = None):
  """get_config() of configs/<name>.py, imported as the package fastadv_jax.configs."""
  mod = importlib.import_module(f"fastadv_jax.configs.{name}")
  return mod.get_config() if arg is None else mod.get_config(arg)


def tiny_config(**overrides):
  """The default config shrunk to run in seconds on mock data (4-filter CNNs). An override that
  is not a config field but a hyperparameter of the config's model (after a `model` override)
  sets `model_args.<model>.<field>`: tiny_config(model="cnn", n_layers=2)."""
  c = load_config()
  c.model_args.small_cnn.n_filters = 4
  c.model_args.cnn.n_filters = 4
  c.batch_size = 16
  c.num_epochs = 2
  c.log_every = 2
  c.eval_every = 4
  c.checkpoint_every = 4
  c.n_eval_points = 16
  c.eval_pgd_steps = 2
  c.n_final_eval = 16
  c.final_pgd_steps = 3
  c.final_pgd_restarts = 2
  c.eval_batch_size = 16
  c.progress_bar = False
  c.data_dir = "/nonexistent-use-mock"
  own = {}
  for k, v in overrides.items():
    if k in ("method_args", "model_args"):  # {name: {field: value}}: a record's own fields
      for name, values in v.items():
        c[k][name].update(values)
    elif k in c:
      c[k] = v
    else:
      own[k] = v
  for k, v in own.items():
    assert k in c.model_args.get(c.model, {}), f"{k}: not a config field nor an arg of {c.model}"
    c.model_args[c.model][k] = v
  return c


PLUGIN_DIRS = (ROOT / "tests" / "plugins", ROOT / "experiments" / "examples")

# The PyTorch environment of the cross-checks (scripts/setup_bench.sh). They run when it is
# installed, unless FASTADV_NO_TORCH is set (scripts/test.sh with FASTADV_TORCH_TESTS=0).
TORCH_PY = ROOT / ".venv-torch" / "bin" / "python"
needs_torch = pytest.mark.skipif(
    not TORCH_PY.exists() or bool(os.environ.get("FASTADV_NO_TORCH")),
    reason="no PyTorch environment (FASTADV_TORCH_TESTS=1 bash scripts/test.sh sets it up)")

# Loads an export with its own model.py (`model.load`) in the PyTorch environment and writes the
# logits of x.npy (NCHW) to y.npy, both in the export's folder.
_TORCH_LOGITS = ("import sys, numpy as np, torch; sys.path.insert(0, sys.argv[1]); import model; "
                 "net = model.load(sys.argv[1]); x = torch.from_numpy(np.load(sys.argv[1] + "
                 "'/x.npy')); np.save(sys.argv[1] + '/y.npy', net(x).detach().numpy())")


def torch_logits(export_dir, x_nhwc):
  """What PyTorch computes for NHWC images `x_nhwc` with the export in `export_dir` (run as a
  user would: its model.py, in the PyTorch environment, a fresh process)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  export_dir = pathlib.Path(export_dir)
  np.save(export_dir / "x.npy", np.asarray(x_nhwc).transpose(0, 3, 1, 2))
  subprocess.run([str(TORCH_PY), "-c", _TORCH_LOGITS, str(export_dir)], check=True, timeout=120)
  return np.load(export_dir / "y.npy")


def pytest_unconfigure(config):
  if _SUITE_CACHE is not None and not hasattr(config, "workerinput"):
    shutil.rmtree(_SUITE_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _registrations_end_with_the_test():
  """What a test registers (directly, or by importing a plugin module) is removed after it, and
  the plugin modules it imported are forgotten, so the next import registers them again: the
  registries are process-wide and tests share a process."""
  from fastadv_jax import methods, models  # pylint: disable=import-outside-toplevel
  from fastadv_jax.autoattack import component  # pylint: disable=import-outside-toplevel
  registries = (methods, models, component)
  before = [set(r.names()) for r in registries]
  modules = set(sys.modules)
  yield
  for registry, names in zip(registries, before):
    for name in set(registry.names()) - names:
      registry.unregister(name)
  for name in set(sys.modules) - modules:
    path = getattr(sys.modules[name], "__file__", None) or ""
    if any(path.startswith(str(d)) for d in PLUGIN_DIRS):
      del sys.modules[name]


def _mapped_regions() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux: nothing to watch
    return 0


# XLA:CPU maps about 6 memory regions for each compiled program, and JAX keeps every program it
# compiled in its caches. A test process that lives through the whole suite compiles tens of
# thousands (every eager op on a new shape is one), and at Linux's default vm.max_map_count
# (65530) the next compilation fails and the process dies with a segfault inside XLA (seen in
# three full-suite runs: the dead worker's core dump held 65194 mappings). Past this many
# mappings the caches are cleared after a test, which unmaps the programs.
MAX_MAPPED_REGIONS = 20000


@pytest.fixture(autouse=True)
def _bounded_compilation_caches():
  yield
  if _mapped_regions() > MAX_MAPPED_REGIONS:
    import gc  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def mock_fashion_mnist():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=48):
    yield


@pytest.fixture
def x64():
  """float64 for the duration of a test (finite differences, closed forms without rounding)."""
  import jax
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)
