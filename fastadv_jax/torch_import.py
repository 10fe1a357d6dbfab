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

from absl import flags
from ml_collections import config_flags

from fastadv_jax import checkpointing, cli, cli_logging, config_validation, torch_interop, workdir

FLAGS = flags.FLAGS
flags.DEFINE_string("state_dict", None, "A PyTorch state_dict: .pt/.pth (needs torch) or .npz.")
flags.DEFINE_string("workdir", None, "New folder for config.json and the checkpoint.")
config_flags.DEFINE_config_file("config", None, "The model's configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["state_dict", "workdir", "config"])


def main(argv):
  del argv
  cli_logging.setup()
  n = torch_interop.import_to_workdir(FLAGS.config, FLAGS.state_dict, FLAGS.workdir)
  print(f"imported {n} tensors from {FLAGS.state_dict} into {FLAGS.workdir}; evaluate with: "
        f"python -m fastadv_jax.evaluate --workdir={FLAGS.workdir} --attack=autoattack")


def run() -> None:
  cli.run(main, (config_validation.ConfigError, checkpointing.CheckpointError,
                 torch_interop.InteropError, workdir.WorkdirError))


if __name__ == "__main__":
  run()
