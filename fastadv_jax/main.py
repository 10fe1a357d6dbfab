"""Command line: python -m fastadv_jax.main --config=configs/default.py --workdir=runs/x
[--config.<field>=<value> ...]. Rerunning the same command resumes from the latest checkpoint."""
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from fastadv_jax import cli_logging, train  # pylint: disable=import-outside-toplevel
  cli_logging.setup()
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
  from fastadv_jax import xla_cpu
  xla_cpu.apply()  # before the first JAX computation starts the backend
  from fastadv_jax import (  # pylint: disable=import-outside-toplevel
      checkpointing, cli, config_validation, datasets, train, workdir)
  cli.run(main, (config_validation.ConfigError, checkpointing.CheckpointError,
                 datasets.DatasetUnavailableError, train.NonFiniteError, workdir.WorkdirError))


if __name__ == "__main__":
  run()
