"""Export a trained run to PyTorch: python -m fastadv_jax.torch_export --workdir=<run>
--out=<dir> [--weights=last|best|averaged|selected] [--force].

Writes <dir>/state_dict.npz, spec.json (architecture and arguments), model.py (a self-contained
nn.Module definition) and, when PyTorch is installed, model.pt. Load it with
`import model; net = model.load("<dir>")` from inside <dir>. See torch_interop.py.

An export never overwrites a file it did not write: it records the SHA-256 of each file it
wrote in <dir>/.fastadv_export.json (MANIFEST), and a later export into <dir> rewrites only
files listed there whose bytes are unchanged. Any other of those names already in <dir> (a
model.py or spec.json of the user's own, or an export the user edited since) stops it in one
line naming the file, before any work, unless --force.
"""
from __future__ import annotations

if __name__ == "__main__":  # the command line: quiet before jax loads (cli_logging's docstring)
  from fastadv_jax.runtime import cli_logging as _quiet
  _quiet.quiet_startup()

import hashlib  # noqa: E402  pylint: disable=wrong-import-position
import json  # noqa: E402  pylint: disable=wrong-import-position
import os  # noqa: E402  pylint: disable=wrong-import-position

from absl import flags  # noqa: E402  pylint: disable=wrong-import-position

from fastadv_jax import cli
from fastadv_jax.cli import shared_flags
from fastadv_jax.data import datasets
from fastadv_jax.interop import torch_interop
from fastadv_jax.runtime import cli_logging
from fastadv_jax.training import checkpointing, saved_run, workdir

FLAGS = flags.FLAGS
shared_flags.define_workdir()
shared_flags.define_weights()
flags.declare_key_flag("workdir")
flags.declare_key_flag("weights")
flags.DEFINE_string("out", None, "Folder to write the export to.")
flags.DEFINE_bool("force", False, "Overwrite files in --out that this exporter did not write.")
flags.mark_flags_as_required(["workdir", "out"])

# What torch_interop.write_export writes into the folder (model.pt only with PyTorch installed).
EXPORT_FILES = ("state_dict.npz", "spec.json", "model.py", "model.pt")
# The exporter's record of the files it wrote: {"files": {name: sha256, or null while writing}}.
MANIFEST = ".fastadv_export.json"


class ExportError(RuntimeError):
  """The export would overwrite a file it did not write, or --out is not a folder."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _manifest(out: str) -> dict:
  """{name: sha256 or None} of the files an earlier export wrote into `out` ({} when there is
  no readable record: then no file there counts as the exporter's)."""
  try:
    with open(os.path.join(out, MANIFEST)) as f:
      files = json.load(f).get("files", {})
    return files if isinstance(files, dict) else {}
  except (OSError, ValueError, AttributeError):
    return {}


def check_out(out: str, force: bool = False) -> None:
  """ExportError, before any work, if writing the export into `out` would overwrite a file the
  exporter did not write (or that was changed since it did), unless `force`. A file recorded
  with no digest was being written when an export was cut off, and is the exporter's."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise ExportError(f"--out: {out} exists and is not a folder")
  if force or not os.path.isdir(out):
    return
  ours = _manifest(out)
  for name in EXPORT_FILES:
    path = os.path.join(out, name)
    if not os.path.lexists(path):
      continue
    if name in ours and (ours[name] is None or (os.path.isfile(path) and
                                                 _sha256(path) == ours[name])):
      continue
    why = "changed since the last export" if name in ours else "not written by torch_export"
    raise ExportError(f"--out: {path} exists ({why}); move it away, choose another --out, or "
                      "pass --force to overwrite it")


def _record(out: str, digests: dict) -> None:
  workdir.write_json(os.path.join(out, MANIFEST), {"files": digests})


def main(argv):
  del argv
  cli_logging.setup()
  config = saved_run.run_config(FLAGS.workdir)
  torch_interop.check_supported(config)  # before any work
  saved_run.check_keeps(config, FLAGS.weights, FLAGS.workdir)
  shape = datasets.IMAGE_SHAPES[config.dataset]
  check_out(FLAGS.out, FLAGS.force)  # before any work
  config, variables, step = saved_run.load_run(FLAGS.workdir, FLAGS.weights, config)
  os.makedirs(FLAGS.out, exist_ok=True)
  # the names about to be written count as the exporter's, should the export be cut off
  _record(FLAGS.out, {**_manifest(FLAGS.out), **{n: None for n in EXPORT_FILES}})
  paths = torch_interop.write_export(
      FLAGS.out, config, variables, datasets.NUM_CLASSES[config.dataset], shape,
      info={"source_workdir": FLAGS.workdir, "weights": FLAGS.weights, "iteration": step,
            "dataset": config.dataset, "eps": config.eps,
            "input": "NCHW float32 in [0, 1], " + (
                "normalised inside the model by its mu and sigma buffers"
                if torch_interop.normalization(config)["input_mean"] else "no normalisation")})
  _record(FLAGS.out, {os.path.basename(p): _sha256(p) for p in paths})
  print("\n".join(paths))


def run() -> None:
  cli.run(main, (checkpointing.CheckpointError, torch_interop.InteropError, workdir.WorkdirError,
                 ExportError, OSError))


if __name__ == "__main__":
  run()
