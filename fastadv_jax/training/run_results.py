"""What a finished run writes to results.json: the final evaluation of its weights and a summary
of the run.

The last weights are evaluated on the first n_final_eval test points (evaluation.
final_evaluation, with the overfitting flag); on the same points with the same noise, the kept
weights (validation-selected, else early-stopped with config.eval_early_stopped_model) and the
weight average, each under its own key. The summary says what ran: the config, iterations,
method hyperparameters, times, devices and versions.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
from absl import logging

from fastadv_jax import parallel
from fastadv_jax.data import datasets
from fastadv_jax.training import evaluation, monitoring, run_plan, workdir


def final_evaluation(config: ml_collections.ConfigDict, evaluator: evaluation.Evaluator,
                     monitor: monitoring.Monitor, last: dict, averaged: dict | None,
                     test_split: datasets.Split, eval_rng: jax.Array, total: int) -> dict:
  """The last weights' final evaluation and the overfitting flag; "selected" or "best" (the
  kept weights) and "averaged" (the weight average's, when the run keeps one)."""
  record = monitor.record
  rng = jax.random.fold_in(eval_rng, -1 % (2**31))
  results = evaluation.final_evaluation(config, evaluator, last, test_split, rng)
  results.update(monitor.overfitting_summary())

  def accuracies(variables: dict) -> dict:
    out = evaluation.final_evaluation(config, evaluator, variables, test_split, rng)
    return {k: out[k] for k in ("clean_acc", "pgd_acc", "autoattack_acc") if k in out}

  if monitor.validation_selection:
    results["selected"] = {"weights": record.selected, "iteration": int(record.best_step),
                           "val_pgd_acc": float(record.best_val_pgd),
                           "val_clean_acc": float(record.best_val_clean),
                           **accuracies(monitor.best)}
  elif config.eval_early_stopped_model:
    results["best"] = {"iteration": int(record.best_step),
                       "train_pgd_acc": float(record.best_train_pgd),
                       **accuracies(monitor.best)}
  if averaged is not None:
    results["averaged"] = {"iteration": total, **accuracies(averaged)}
  return results


def run_summary(plan: run_plan.RunPlan, record: monitoring.RunRecord, total: int,
                train_time: float, wall_start: float, final_train_metrics: dict) -> dict:
  """What results.json says about the run besides its accuracies."""
  config = plan.config
  return {
      "config": workdir.config_dict(config), "iterations": total, "epochs": config.num_epochs,
      "method": config.method,
      "method_args": dataclasses.asdict(plan.method_args),
      "train_time_s": train_time, "wall_time_s": time.time() - wall_start,
      "devices": [str(d) for d in parallel.local_devices()],
      "final_train_metrics": final_train_metrics,
      "step_time_s": record.step_seconds / max(record.timed_steps, 1),
      "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def log_results(results: dict, workdir_: str) -> None:
  """One log line with the headline accuracies and where results.json is."""
  robust = []
  if "pgd_acc" in results:
    robust.append(f"PGD-{results['pgd_steps']}-{results['pgd_restarts']} "
                  f"{results['pgd_acc']:.4f}")
  if "autoattack_acc" in results:
    robust.append(f"AutoAttack {results['autoattack_acc']:.4f}")
  logging.info("Results: clean %.4f, %s on %d test points; written to %s",
               results["clean_acc"], ", ".join(robust), results["n_eval"],
               os.path.join(workdir_, "results.json"))
