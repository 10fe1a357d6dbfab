"""The flags that several command lines take, each defined once, here: absl refuses a second
definition of a name from another module, so a process that imports several command lines (the
API reference, a test) would otherwise fail on the second. Each command line calls the
`define_*` of the flags it takes (defining nothing the others take alone) and declares them its
key flags, so its --help lists them."""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from fastadv_jax.training import saved_run


def define_workdir() -> None:
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string("workdir", None, "The run's folder (config.json, checkpoints, metrics, "
                        "results): written by training and torch_import, read by evaluate and "
                        "torch_export.")


def define_weights() -> None:
  if "weights" not in flags.FLAGS:
    flags.DEFINE_enum("weights", "last", list(saved_run.WEIGHTS),
                      "Last weights, early-stopped ones (best), the last weight average "
                      "(averaged, config.ema_decay > 0), or those selected on the validation "
                      "split (selected, config.selection=validation).")


def define_config() -> None:
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", None, "The configuration file (a get_config() "
                                    "module, with :overrides).", lock_config=True)
