"""Command line: python -m fastadv_jax.main --config=configs/default.py --workdir=runs/x
[--config.<field>=<value> ...]. Rerunning the same command resumes from the latest checkpoint.

Several processes (hosts) as one run: the same command in each, plus --coordinator_address=
host:port --num_processes=N --process_id=i (or FASTADV_COORDINATOR_ADDRESS / _NUM_PROCESSES /
_PROCESS_ID), or --distributed=auto where JAX detects the cluster (TPU pods, SLURM); see
distributed.py and README "Several hosts"."""
from absl import app, flags
from ml_collections import config_flags

from fastadv_jax import distributed_flags  # --distributed, --coordinator_address, ...

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.")
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.adopt_module_key_flags(distributed_flags)  # listed by --help
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # pylint: disable-next=import-outside-toplevel
  from fastadv_jax import cli_logging, compilation_cache, train, xla_cpu
  xla_cpu.apply(model=FLAGS.config.model)  # before the first JAX computation starts the backend
  cli_logging.setup()
  compilation_cache.enable()  # a resumed run loads its compiled programs
  distributed_flags.initialize(training=True)  # before any JAX computation
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
  from fastadv_jax import cli_logging  # pylint: disable=import-outside-toplevel
  cli_logging.quiet_startup()  # before jax and TensorFlow load (cli_logging's docstring)
  from fastadv_jax import (  # pylint: disable=import-outside-toplevel
      checkpointing, cli, config_validation, datasets, distributed, evaluation, plugins, train,
      workdir)
  try:  # before the config file is read: plugin methods' hyperparameters are config fields
    plugins.load_for_command_line()
  except plugins.PluginError as e:
    cli.fail(f"--config.plugins: {e}")
  cli.run(main, (config_validation.ConfigError, checkpointing.CheckpointError,
                 datasets.DatasetUnavailableError, train.NonFiniteError, train.StartError,
                 workdir.WorkdirError,
                 distributed.DistributedError, evaluation.NonFiniteOutputError))


if __name__ == "__main__":
  run()
