"""The flags that join a command line to a multi-process run (distributed.py), shared by
`fastadv_jax.main` and `fastadv_jax.evaluate`: defined here once, so both modules can be
imported into one process (absl refuses a flag defined twice). Imports no JAX until used, so
the command lines stay quiet at start-up (cli_logging)."""
from absl import flags
from fastadv_jax.runtime import distributed

FLAGS = flags.FLAGS
flags.DEFINE_enum("distributed", "off", ["off", "auto"],
                  "auto: jax.distributed.initialize() detects the cluster (TPU pod, SLURM).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for several processes.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_float("distributed_timeout", None, "Seconds a multi-process run waits for all its "
                   "processes to connect before it stops with one line (default: "
                   "FASTADV_DISTRIBUTED_TIMEOUT, else 120).")


def initialize(training: bool = False) -> bool:
  """distributed.initialize with these flags (the FASTADV_* variables fill what they leave
  unset); call before any JAX computation. True in a multi-process run. `training`: the
  first-step watchdog is armed (distributed.made_progress stops it)."""
  return distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address,
                                FLAGS.num_processes, FLAGS.process_id,
                                timeout_s=FLAGS.distributed_timeout, training=training)
