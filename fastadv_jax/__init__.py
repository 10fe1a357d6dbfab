"""fastadv_jax: fast adversarial training and GradAlign in JAX/Flax.

The package is layered; each layer imports only the layers above it in this list:

  runtime/   platform glue: XLA:CPU flags, jax.distributed, the compilation cache, console
             logging, plugin loading. Imports nothing else of the package.
  (library)  the functional API, for any model and training loop: `attacks`, `gradalign`,
             `losses`, `randomness`, `parallel` (device axis and placement), `registry`,
             `methods/`, `autoattack/`, `models`. Never imports the layers below, nor a config
             library.
  data/      data sets as uint8 arrays on the host; on-device augmentation.
  training/  the trainer: train_and_evaluate(config, workdir), its step, state, engines,
             checkpoints, workdir files, diagnostics, final evaluation, weight averaging.
  interop/   Flax variables <-> PyTorch state_dicts, and the PyTorch models.
  cli/       the command lines' shared flags and one-line error path.
  main, evaluate, benchmark, torch_export, torch_import: the command lines
             (`python -m fastadv_jax.main ...`).

tests/test_layers.py checks this from the import graph. The functional API is importable from
here: `from fastadv_jax import gradalign, methods, autoattack`.
"""

from fastadv_jax import attacks, autoattack, gradalign, losses, methods, models, randomness

__all__ = ["attacks", "autoattack", "gradalign", "losses", "methods", "models", "randomness"]

__version__ = "0.1.0"
