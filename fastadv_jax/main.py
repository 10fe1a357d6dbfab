"""Command line: python -m fastadv_jax.main --config=configs/default.py --workdir=runs/x
[--config.<field>=<value> ...]. Rerunning the same command resumes from the latest checkpoint.

Several processes (hosts) as one run: the same command in each, plus --coordinator_address=
host:port --num_processes=N --process_id=i (or FASTADV_COORDINATOR_ADDRESS / _NUM_PROCESSES /
_PROCESS_ID), or --distributed=auto where JAX detects the cluster (TPU pods, SLURM); see
runtime/distributed.py and docs/devices.md."""
from __future__ import annotations

if __name__ == "__main__":  # the command line: quiet before jax loads (cli_logging's docstring)
  from fastadv_jax.runtime import cli_logging as _quiet
  _quiet.quiet_startup()

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from fastadv_jax import cli, models
from fastadv_jax.cli import distributed_flags  # --distributed, --coordinator_address, ...
from fastadv_jax.cli import shared_flags
from fastadv_jax.data import datasets
from fastadv_jax.runtime import cli_logging, compilation_cache, distributed, plugins, xla_cpu
from fastadv_jax.training import (checkpointing, config_validation, evaluation, train,
                                  train_metrics, workdir)

FLAGS = flags.FLAGS
shared_flags.define_workdir()
shared_flags.define_config()
flags.declare_key_flag("workdir")
flags.declare_key_flag("config")
flags.adopt_module_key_flags(distributed_flags)  # listed by --help
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # before the first JAX computation starts the backend
  xla_cpu.apply(flags=models.xla_flags(FLAGS.config.model))
  cli_logging.setup()
  compilation_cache.enable()  # a resumed run loads its compiled programs
  distributed_flags.initialize(training=True)  # before any JAX computation
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
  """The command line (`python -m fastadv_jax.main`): one line and exit 2 on an expected error."""
  cli_logging.quiet_startup()  # again, for callers of run() that did not run this module
  try:  # before the config file is read: plugin methods' hyperparameters are config fields
    plugins.load_for_command_line()
  except plugins.PluginError as e:
    cli.fail(f"--config.plugins: {e}")
  cli.run(main, (config_validation.ConfigError, checkpointing.CheckpointError,
                 datasets.DatasetUnavailableError, train_metrics.NonFiniteError, train.StartError,
                 workdir.WorkdirError,
                 distributed.DistributedError, evaluation.NonFiniteOutputError))


if __name__ == "__main__":
  run()
