"""Evaluate a trained run: python -m fastadv_jax.evaluate --workdir=<dir>
[--weights=last|best|averaged|selected] [--eps=<the run's eps>] [--n_eval=<its n_final_eval>]
[--attack=pgd|autoattack|pgd,autoattack|apgd-ce,apgd-t,...] [--pgd_steps=50] [--pgd_restarts=10]
[--seed=0] [--norm=Linf|L2|L1] [--apgd_steps=100] [--fab_steps=100] [--square_queries=5000]
[--plugins=my_pkg.my_attack,...].

`--norm=L2` evaluates in the L2 threat model: eps (required then, since the run's eps is an
L-inf radius) bounds the Euclidean norm of the whole perturbation in pixel units, so it may
exceed 1 (e.g. 1.0 on 28 x 28 images). `--norm=L1` likewise bounds the sum of the absolute
changes (e.g. 12 on CIFAR-10's 32 x 32 x 3 images), with L1-APGD and the reference's L1
settings (--attack=apgd-ce,apgd-t: APGD-CE 5 times, APGD-T on 5 target classes; there is no L1
PGD, FAB or Square yet). Every AutoAttack component asked for must implement the norm
(Component.norms): one that does not is refused with one line naming it.

`--attack` takes any registered AutoAttack component: the built-in ones, those of installed
plugins (entry points), of the run's own `config.plugins` (config.json) and of `--plugins`, all
imported before `--attack` is checked.

Reads the run's config.json and latest checkpoint; prints and writes
`<workdir>/eval_<weights>_eps<eps>_n<n>_<attacks>.json` (e.g. `..._pgd50x10.json`,
`..._pgd50x10+aa-standard.json`; with --norm=L2 `eval_<weights>_L2_eps<eps>_...`; the JSON's
`norm` field says which). Every setting that changes the numbers is in the name when it is not
its default (`_seed1`, `aa-standard-apgd50-square1000`), and in the JSON always, so two settings
never share a file. Beside it, the per-point verdicts as `<same name>.npz`:
`clean`, `pgd_robust` (with PGD), `autoattack_robust` and `autoattack_broken_by` (with
AutoAttack: the index into `autoattack_attacks` of the attack that broke the point, else -1),
each indexed by the test point's position.

Several processes (hosts) evaluate as one, with the flags of `fastadv_jax.main`: the same
command in each, plus --coordinator_address=host:port --num_processes=N --process_id=i (or
FASTADV_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID), or --distributed=auto;
--distributed_timeout bounds the wait for the others. Each process evaluates its contiguous
share of the points on its own devices, the per-point results are gathered (the same numbers as
one process with all the devices), and process 0 alone prints and writes the outputs.
`autoattack_seconds` is process 0's time per attack, `autoattack_seconds_per_process` every
process's (one entry in a single-process run).
"""
from __future__ import annotations

if __name__ == "__main__":  # the command line: quiet before jax loads (cli_logging's docstring)
  from fastadv_jax.runtime import cli_logging as _quiet
  _quiet.quiet_startup()

import json  # noqa: E402  pylint: disable=wrong-import-position
import math
import os
import time

import jax
import numpy as np
from absl import flags

from fastadv_jax import autoattack, cli, models
from fastadv_jax.cli import distributed_flags, shared_flags
from fastadv_jax.data import datasets
from fastadv_jax.runtime import cli_logging, compilation_cache, distributed, plugins, xla_cpu
from fastadv_jax.training import checkpointing, evaluation, model_config, saved_run, workdir

FLAGS = flags.FLAGS
# AutoAttack's iteration and query budgets (the reference's); evaluate passes the flags' values.
AA_DEFAULTS = {"apgd_steps": 100, "fab_steps": 100, "square_queries": 5000}
_AA_SHORT = {"apgd_steps": "apgd", "fab_steps": "fab", "square_queries": "square"}
shared_flags.define_workdir()
shared_flags.define_weights()
flags.declare_key_flag("workdir")
flags.declare_key_flag("weights")
flags.DEFINE_float("eps", None, "Radius in pixel units (L-inf: per pixel, in [0, 1]; L2, L1: of "
                   "the whole perturbation, > 0); default: the training eps (L-inf only).")
flags.DEFINE_enum("norm", "Linf", ["Linf", "L2", "L1"], "Threat model of the evaluation's "
                  "attacks.")
flags.DEFINE_integer("n_eval", None, "First n test points (-1 = all); default: n_final_eval.")
flags.DEFINE_string("attack", "pgd", "pgd, autoattack (standard), autoattack-rand, "
                    "autoattack-plus, or AutoAttack components (apgd-ce, apgd-t, fab-t, square, "
                    "apgd-dlr, fab, or any registered by a plugin), comma-separated.")
flags.DEFINE_integer("pgd_steps", 50, "PGD iterations.")
flags.DEFINE_integer("pgd_restarts", 10, "PGD restarts.")
flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts.")
flags.DEFINE_integer("apgd_steps", AA_DEFAULTS["apgd_steps"],
                     "AutoAttack: iterations of each APGD attack (the reference's 100).")
flags.DEFINE_integer("fab_steps", AA_DEFAULTS["fab_steps"],
                     "AutoAttack: iterations of each FAB attack (the reference's 100).")
flags.DEFINE_integer("square_queries", AA_DEFAULTS["square_queries"],
                     "AutoAttack: queries of the Square attack (the reference's 5000).")
flags.DEFINE_string("plugins", "", "Modules to import first, comma-separated (e.g. ones that "
                    "register AutoAttack components with autoattack.register), on top of the "
                    "run's config.plugins and installed plugins.")
flags.adopt_module_key_flags(distributed_flags)  # listed by --help
flags.mark_flags_as_required(["workdir"])


class UsageError(ValueError):
  """A command-line value the evaluation cannot run with."""


run_config, load_run = saved_run.run_config, saved_run.load_run  # public here too


def check_flags(eps: float, n_eval: int, steps: int, restarts: int, attack: str = "pgd",
                norm: str = "Linf", aa_settings: dict[str, int] | None = None
                ) -> tuple[bool, tuple[str, ...]]:
  """One line naming the first bad flag, before any work; returns parse_attack_spec(attack)."""
  try:
    plan = evaluation.parse_attack_spec(attack)
  except ValueError as e:
    raise UsageError(f"--attack: {e}") from None
  if not math.isfinite(eps):
    raise UsageError(f"--eps: must be a finite number, got {eps}")
  for name, value in (aa_settings or {}).items():
    if value < 1:
      raise UsageError(f"--{name}: must be >= 1, got {value}")
  if norm == "Linf":
    if not 0.0 <= eps <= 1.0:
      raise UsageError(f"--eps: must be in [0, 1] (pixel units, e.g. 8/255), got {eps}")
    if plan[1] and eps == 0.0:
      raise UsageError("--eps: AutoAttack needs eps > 0")
  elif norm in ("L2", "L1"):
    if not eps > 0.0:  # not NaN either
      example = "1.0 on 28 x 28 images" if norm == "L2" else "12 on 32 x 32 x 3 images"
      raise UsageError(f"--eps: the {norm} radius must be > 0 (the whole perturbation's norm, "
                       f"e.g. {example}), got {eps}")
    if norm == "L1" and plan[0]:
      raise UsageError("--attack: pgd has no L1 version; run L1-APGD with "
                       "--attack=apgd-ce,apgd-t")
    unsupported = autoattack.runner.without_norm(plan[1], norm)
    if unsupported:
      able = [a for a in plan[1] if a not in unsupported]
      raise UsageError(f"--attack: {', '.join(unsupported)} "
                       f"{'does' if len(unsupported) == 1 else 'do'} not implement the {norm} "
                       f"threat model yet" + (f"; run the others with --attack={','.join(able)}"
                                              if able else ""))
  else:
    raise UsageError(f"--norm: must be Linf, L2 or L1, got {norm!r}")
  if n_eval != -1 and n_eval < 1:
    raise UsageError(f"--n_eval: must be -1 (all) or >= 1, got {n_eval}")
  if steps < 1:
    raise UsageError(f"--pgd_steps: must be >= 1, got {steps}")
  if restarts < 1:
    raise UsageError(f"--pgd_restarts: must be >= 1, got {restarts}")
  return plan


def output_name(weights: str, eps: float, n: int, run_pgd: bool, aa_attacks: tuple[str, ...],
                steps: int, restarts: int, norm: str = "Linf", seed: int = 0,
                aa_settings: dict[str, int] | None = None) -> str:
  """The output file's name. The norm, the seed and AutoAttack's budgets appear only where
  they differ from their defaults, so the names of default evaluations are as they were."""
  parts = [f"pgd{steps}x{restarts}"] if run_pgd else []
  if aa_attacks:
    budgets = "".join(f"-{_AA_SHORT[k]}{v}" for k, v in sorted((aa_settings or {}).items())
                      if v != AA_DEFAULTS[k] and _budget_used(k, aa_attacks))
    parts.append("aa-" + (autoattack.version_of(aa_attacks) or "+".join(aa_attacks)) + budgets)
  threat = "" if norm == "Linf" else f"{norm}_"
  seeded = f"_seed{seed}" if seed else ""
  return f"eval_{weights}_{threat}eps{eps:.4f}_n{n}_{'+'.join(parts)}{seeded}.json"


def _budget_used(setting: str, attacks: tuple[str, ...]) -> bool:
  """Whether a budget can change what `attacks` compute: the built-in attacks of its family
  (apgd-*, fab*, square) and, to be safe, any attack of a plugin."""
  family = _AA_SHORT[setting]
  built_in = ("apgd", "fab", "square")
  return any(a.startswith(family) or not a.startswith(built_in) for a in attacks)


def load_plugins(extra: str) -> None:
  """Installed plugins and `--plugins`, as UsageError on failure (the run's own config.plugins
  are imported by run_config); before `--attack` is checked against the registry."""
  try:
    plugins.load_entry_points()
  except plugins.PluginError as e:
    raise UsageError(str(e)) from None
  try:
    plugins.load(extra)
  except plugins.PluginError as e:
    raise UsageError(f"--plugins: {e}") from None


def _attack(ev: evaluation.Evaluator, variables, x: np.ndarray, y: np.ndarray, eps: float,
            run_pgd: bool, aa_attacks: tuple[str, ...], aa_settings: dict, result: dict,
            points: dict) -> None:
  """The PGD and the AutoAttack the flags ask for: their per-point verdicts go into `points`,
  their accuracies, settings and times into `result`."""
  if run_pgd:
    start = time.perf_counter()
    points["pgd_robust"] = ev.robust_points(variables, x, y, eps, FLAGS.pgd_steps,
                                            FLAGS.pgd_restarts, jax.random.key(FLAGS.seed),
                                            progress=True)
    result.update(pgd_steps=FLAGS.pgd_steps, pgd_restarts=FLAGS.pgd_restarts,
                  pgd_acc=float(np.mean(points["pgd_robust"])),
                  pgd_seconds=round(time.perf_counter() - start, 3))
  if aa_attacks:
    start = time.perf_counter()
    aa = ev.autoattack(variables, x, y, eps, aa_attacks, FLAGS.seed, result.get("pgd_acc"),
                       **aa_settings)
    result.update(aa.summary(), autoattack_total_seconds=round(time.perf_counter() - start, 3),
                  autoattack_settings=aa_settings)
    points.update(autoattack_robust=aa.robust, autoattack_broken_by=aa.broken_by)


def main(argv):
  del argv
  cli_logging.setup()
  load_plugins(FLAGS.plugins)
  config = run_config(FLAGS.workdir)  # imports config.plugins
  xla_cpu.apply(flags=models.xla_flags(config.model))  # before JAX's backend starts
  compilation_cache.enable()  # a second evaluation loads the attacks' compiled programs
  distributed_flags.initialize()  # before any JAX computation
  if FLAGS.eps is None and FLAGS.norm != "Linf":
    raise UsageError(f"--eps: give the {FLAGS.norm} radius (the run's eps {config.eps} is an "
                     "L-inf one)")
  eps = config.eps if FLAGS.eps is None else FLAGS.eps
  n_eval = config.n_final_eval if FLAGS.n_eval is None else FLAGS.n_eval
  aa_settings = {name: FLAGS[name].value for name in AA_DEFAULTS}
  run_pgd, aa_attacks = check_flags(eps, n_eval, FLAGS.pgd_steps, FLAGS.pgd_restarts,
                                    FLAGS.attack, FLAGS.norm, aa_settings)
  if aa_attacks:
    try:
      autoattack.check_classes(aa_attacks, datasets.NUM_CLASSES[config.dataset])
    except ValueError as e:
      raise UsageError(f"--attack: {e}") from None
  saved_run.check_keeps(config, FLAGS.weights, FLAGS.workdir)  # before the data is loaded
  saved_run.check_has_checkpoint(FLAGS.workdir)
  workdir.check_writable(FLAGS.workdir)  # fail now, not after the whole evaluation
  test = datasets.load_split(config.dataset, "test", config.data_dir, config.download)
  config, variables, step = load_run(FLAGS.workdir, FLAGS.weights, config)
  n = len(test) if n_eval == -1 else min(n_eval, len(test))
  if n < jax.process_count():
    raise UsageError(f"--n_eval: {n} points cannot be split over {jax.process_count()} processes")
  model = model_config.create_model(config, datasets.NUM_CLASSES[config.dataset],
                                    half_precision=False)
  ev = evaluation.Evaluator(model, config.eval_batch_size, step_alpha=config.eval_step_alpha,
                           norm=FLAGS.norm)
  x, y = test.images[:n], test.labels[:n]
  start = time.perf_counter()
  clean = ev.clean_points(variables, x, y)
  result = {"weights": FLAGS.weights, "iteration": step, "eps": eps, "norm": FLAGS.norm,
            "n_eval": n, "seed": FLAGS.seed, "clean_acc": float(np.mean(clean)),
            "clean_seconds": round(time.perf_counter() - start, 3),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
  points = {"clean": clean}
  _attack(ev, variables, x, y, eps, run_pgd, aa_attacks, aa_settings, result, points)
  if not distributed.is_main():
    return
  out = os.path.join(FLAGS.workdir, output_name(FLAGS.weights, eps, n, run_pgd, aa_attacks,
                                                FLAGS.pgd_steps, FLAGS.pgd_restarts, FLAGS.norm,
                                                FLAGS.seed, aa_settings))
  workdir.write_npz(os.path.splitext(out)[0] + ".npz", points)
  workdir.write_json(out, result)
  print(json.dumps(result, indent=2))


def run() -> None:
  cli.run(main, (UsageError, checkpointing.CheckpointError, datasets.DatasetUnavailableError,
                 workdir.WorkdirError, distributed.DistributedError,
                 evaluation.NonFiniteOutputError))


if __name__ == "__main__":
  run()
