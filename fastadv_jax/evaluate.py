"""Evaluate a trained run: python -m fastadv_jax.evaluate --workdir=<dir> [--weights=last|best]
[--eps=0.0314] [--n_eval=1000] [--pgd_steps=50] [--pgd_restarts=10].

Reads the run's config.json and latest checkpoint; prints and writes
`<workdir>/eval_<weights>_eps<eps>_n<n>_pgd<steps>x<restarts>.json`.
"""
from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
from absl import app, flags

from fastadv_jax import (checkpointing, cli_logging, data, evaluation, models, train_step,
                         xla_cpu_flags)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.")
flags.DEFINE_enum("weights", "last", ["last", "best"], "Last weights, or early-stopped ones.")
flags.DEFINE_float("eps", None, "L-inf radius in pixel units; default: the training eps.")
flags.DEFINE_integer("n_eval", None, "First n test points (-1 = all); default: n_final_eval.")
flags.DEFINE_integer("pgd_steps", 50, "PGD iterations.")
flags.DEFINE_integer("pgd_restarts", 10, "PGD restarts.")
flags.DEFINE_integer("seed", 0, "Seed of the attack's random starts.")
flags.mark_flags_as_required(["workdir"])


def load_run(workdir: str, weights: str = "last"
             ) -> tuple[ml_collections.ConfigDict, dict, int]:
  """(config, evaluation variables, iteration) of a run's latest checkpoint."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise checkpointing.CheckpointError(f"{path} not found: is {workdir} a training workdir?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ckpt = checkpointing.Checkpointer(workdir)
  step = ckpt.latest_step()
  if step is None:
    raise checkpointing.CheckpointError(f"no checkpoint in {ckpt.directory}")
  shape = data.load_split(config.dataset, "test", config.data_dir, config.download).images.shape
  model = models.create_model(config, data.NUM_CLASSES[config.dataset], half_precision=False)
  state = train_step.create_train_state(config, model, jax.random.key(0), shape[1:], 1)
  best = {"params": state.params, "batch_stats": state.batch_stats}
  state, best, meta = ckpt.restore(step, state, best)
  ckpt.close()
  if weights == "best":
    return config, best, int(meta["best_step"])
  return config, {"params": state.params, "batch_stats": state.batch_stats}, step


def main(argv):
  del argv
  xla_cpu_flags.apply()  # before the first JAX computation starts the backend
  cli_logging.setup()
  try:
    config, variables, step = load_run(FLAGS.workdir, FLAGS.weights)
  except (checkpointing.CheckpointError, data.DatasetUnavailableError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  eps = config.eps if FLAGS.eps is None else FLAGS.eps
  n_eval = config.n_final_eval if FLAGS.n_eval is None else FLAGS.n_eval
  test = data.load_split(config.dataset, "test", config.data_dir, config.download)
  n = len(test) if n_eval == -1 else min(n_eval, len(test))
  model = models.create_model(config, data.NUM_CLASSES[config.dataset], half_precision=False)
  ev = evaluation.Evaluator(model, config.eval_batch_size)
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
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  app.run(main)
