"""Evaluate a trained run: python -m fastadv_jax.evaluate --workdir=<dir> [--weights=last|best]
[--eps=0.0314] [--n_eval=1000] [--pgd_steps=50] [--pgd_restarts=10].

Reads the run's config.json and latest checkpoint; prints and writes
`<workdir>/eval_<weights>_eps<eps>_n<n>_pgd<steps>x<restarts>.json`.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import flags

from fastadv_jax import (checkpointing, cli, cli_logging, datasets, evaluation, models, workdir,
                         xla_cpu)
from fastadv_jax import train_state as ts

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_enum("weights", "last", ["last", "best"], "Last weights, or early-stopped ones.")
flags.DEFINE_float("eps", None, "L-inf radius in pixel units; default: the training eps.")
flags.DEFINE_integer("n_eval", None, "First n test points (-1 = all); default: n_final_eval.")
flags.DEFINE_integer("pgd_steps", 50, "PGD iterations.")
flags.DEFINE_integer("pgd_restarts", 10, "PGD restarts.")
flags.DEFINE_integer("seed", 0, "Seed of the attack's random starts.")
flags.mark_flags_as_required(["workdir"])


class UsageError(ValueError):
  """A command-line value the evaluation cannot run with."""


def run_config(workdir_: str) -> ml_collections.ConfigDict:
  """The config.json of a training workdir; CheckpointError if there is none."""
  config = workdir.read_config(workdir_)
  if config is None:
    raise checkpointing.CheckpointError(
        f"{os.path.join(workdir_, 'config.json')} not found: is {workdir_} a training workdir?")
  return config


def load_run(workdir_: str, weights: str = "last", test_split: datasets.Split | None = None,
             config: ml_collections.ConfigDict | None = None
             ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, evaluation variables, iteration) of a run's latest checkpoint."""
  config = run_config(workdir_) if config is None else config
  if not os.path.isdir(os.path.join(workdir_, "checkpoints")):
    raise checkpointing.CheckpointError(f"no checkpoint in {workdir_}: has the run started?")
  ckpt = checkpointing.Checkpointer(workdir_)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise checkpointing.CheckpointError(f"no checkpoint in {ckpt.directory}")
    if test_split is None:
      test_split = datasets.load_split(config.dataset, "test", config.data_dir, config.download)
    model = models.create_model(config, datasets.NUM_CLASSES[config.dataset],
                                half_precision=False)
    state = ts.create_train_state(config, model, jax.random.key(0),
                                  test_split.images.shape[1:], 1)
    ckpt.verify(step)
    state, best, meta = ckpt.restore(step, state, ts.variables(state))
  finally:
    ckpt.close()
  if weights == "best":
    return config, best, int(meta["best_step"])
  return config, ts.variables(state), step


def check_flags(eps: float, n_eval: int, steps: int, restarts: int) -> None:
  """One line naming the first bad flag, before any work."""
  if not 0.0 <= eps <= 1.0:
    raise UsageError(f"--eps: must be in [0, 1] (pixel units, e.g. 8/255), got {eps}")
  if n_eval != -1 and n_eval < 1:
    raise UsageError(f"--n_eval: must be -1 (all) or >= 1, got {n_eval}")
  if steps < 1:
    raise UsageError(f"--pgd_steps: must be >= 1, got {steps}")
  if restarts < 1:
    raise UsageError(f"--pgd_restarts: must be >= 1, got {restarts}")


def main(argv):
  del argv
  cli_logging.setup()
  config = run_config(FLAGS.workdir)
  eps = config.eps if FLAGS.eps is None else FLAGS.eps
  n_eval = config.n_final_eval if FLAGS.n_eval is None else FLAGS.n_eval
  check_flags(eps, n_eval, FLAGS.pgd_steps, FLAGS.pgd_restarts)
  workdir.check_writable(FLAGS.workdir)  # fail now, not after the whole evaluation
  test = datasets.load_split(config.dataset, "test", config.data_dir, config.download)
  config, variables, step = load_run(FLAGS.workdir, FLAGS.weights, test, config)
  n = len(test) if n_eval == -1 else min(n_eval, len(test))
  model = models.create_model(config, datasets.NUM_CLASSES[config.dataset], half_precision=False)
  ev = evaluation.Evaluator(model, config.eval_batch_size, step_alpha=config.eval_step_alpha)
  x, y = test.images[:n], test.labels[:n]
  result = {
      "weights": FLAGS.weights, "iteration": step, "eps": eps, "n_eval": n,
      "pgd_steps": FLAGS.pgd_steps, "pgd_restarts": FLAGS.pgd_restarts,
      "clean_acc": ev.clean_accuracy(variables, x, y),
      "pgd_acc": ev.robust_accuracy(variables, x, y, eps, FLAGS.pgd_steps, FLAGS.pgd_restarts,
                                    jax.random.key(FLAGS.seed)),
  }
  out = os.path.join(FLAGS.workdir, f"eval_{FLAGS.weights}_eps{eps:.4f}_n{n}_pgd"
                                    f"{FLAGS.pgd_steps}x{FLAGS.pgd_restarts}.json")
  workdir.write_json(out, result)
  print(json.dumps(result, indent=2))


def run() -> None:
  xla_cpu.apply()  # before the first JAX computation starts the backend
  cli.run(main, (UsageError, checkpointing.CheckpointError, datasets.DatasetUnavailableError,
                 workdir.WorkdirError))


if __name__ == "__main__":
  run()
