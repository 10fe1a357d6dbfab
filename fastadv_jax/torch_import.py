"""Import a PyTorch state_dict as a checkpoint that `evaluate` reads:
python -m fastadv_jax.torch_import --state_dict=<model.pt|state_dict.npz>
--config=configs/<file>.py [--config.<field>=<value> ...] --workdir=<new dir>.

The config names the architecture (config.model and its arguments) and the dataset; the
state_dict must be in the layout of torch_models.py (the original code's). Writes
<workdir>/config.json and a checkpoint at iteration 0 holding the imported weights as both the
last and the early-stopped weights. Then: python -m fastadv_jax.evaluate --workdir=<workdir>
--attack=autoattack.
"""
from __future__ import annotations

if __name__ == "__main__":  # the command line: quiet before jax loads (cli_logging's docstring)
  from fastadv_jax.runtime import cli_logging as _quiet
  _quiet.quiet_startup()

import os  # noqa: E402  pylint: disable=wrong-import-position

from absl import flags  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np
import zipfile
import zlib

from fastadv_jax import cli
from fastadv_jax.cli import shared_flags
from fastadv_jax.interop import torch_interop
from fastadv_jax.runtime import cli_logging
from fastadv_jax.training import checkpointing, config_validation, workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("state_dict", None, "A PyTorch state_dict: .pt/.pth (needs torch) or .npz.")
shared_flags.define_workdir()  # a new folder here
shared_flags.define_config()
flags.declare_key_flag("workdir")
flags.declare_key_flag("config")
flags.mark_flags_as_required(["state_dict", "workdir", "config"])


def check_state_dict_file(path: str) -> None:
  """InteropError naming the file, before any work, if `path` is not a readable file or (for
  .npz) not a numpy archive of arrays: numpy's own errors (a zip error, "contains pickled
  data") would not say which file, or which flag, is to blame."""
  if not os.path.exists(path):
    raise torch_interop.InteropError(f"--state_dict: {path} does not exist")
  if not os.path.isfile(path):
    raise torch_interop.InteropError(f"--state_dict: {path} is not a file")
  try:
    with open(path, "rb") as f:
      f.read(1)
    if path.endswith(".npz"):
      if not zipfile.is_zipfile(path):  # numpy.savez writes a zip of .npy files
        raise ValueError("not a .npz archive")
      with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
          npz[key]  # pylint: disable=pointless-statement  (reads and checks every array)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise torch_interop.InteropError(
        f"--state_dict: {path} cannot be read as a state_dict ({why[:200]}); expected a .npz "
        "of arrays (numpy.savez) or a PyTorch .pt/.pth") from None


def main(argv):
  del argv
  cli_logging.setup()
  check_state_dict_file(FLAGS.state_dict)  # before any work
  n = torch_interop.import_to_workdir(FLAGS.config, FLAGS.state_dict, FLAGS.workdir)
  print(f"imported {n} tensors from {FLAGS.state_dict} into {FLAGS.workdir}; evaluate with: "
        f"python -m fastadv_jax.evaluate --workdir={FLAGS.workdir} --attack=autoattack")


def run() -> None:
  cli.run(main, (config_validation.ConfigError, checkpointing.CheckpointError,
                 torch_interop.InteropError, workdir.WorkdirError))


if __name__ == "__main__":
  run()
