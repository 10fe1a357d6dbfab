"""Export a trained run to PyTorch: python -m fastadv_jax.torch_export --workdir=<run>
--out=<dir> [--weights=last|best].

Writes <dir>/state_dict.npz, spec.json (architecture and arguments), model.py (a self-contained
nn.Module definition) and, when PyTorch is installed, model.pt. Load it with
`import model; net = model.load("<dir>")` from inside <dir>. See torch_interop.py.
"""
from __future__ import annotations

from absl import flags

from fastadv_jax import checkpointing, cli, cli_logging, datasets, torch_interop, workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_string("out", None, "Folder to write the export to.")
flags.DEFINE_enum("weights", "last", ["last", "best"], "Last weights, or early-stopped ones.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  cli_logging.setup()
  from fastadv_jax import saved_run  # pylint: disable=import-outside-toplevel
  config = saved_run.run_config(FLAGS.workdir)
  torch_interop.check_supported(config)  # before any work
  shape = datasets.IMAGE_SHAPES[config.dataset]
  config, variables, step = saved_run.load_run(FLAGS.workdir, FLAGS.weights, config)
  paths = torch_interop.write_export(
      FLAGS.out, config, variables, datasets.NUM_CLASSES[config.dataset], shape,
      info={"source_workdir": FLAGS.workdir, "weights": FLAGS.weights, "iteration": step,
            "dataset": config.dataset, "eps": config.eps,
            "input": "NCHW float32 in [0, 1], no normalisation"})
  print("\n".join(paths))


def run() -> None:
  cli.run(main, (checkpointing.CheckpointError, torch_interop.InteropError, workdir.WorkdirError,
                 OSError))


if __name__ == "__main__":
  run()
