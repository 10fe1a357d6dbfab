"""Watching a run: periodic diagnostics, early stopping and the catastrophic-overfitting flag.

`RunRecord` is the run's bookkeeping (saved with every checkpoint, so a resumed run continues
it); `Monitor.run(step, variables)` evaluates the fixed diagnostic points and updates it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from absl import logging

from fastadv_jax import datasets, evaluation


@dataclasses.dataclass
class RunRecord:
  """What a run remembers across checkpoints besides its weights."""
  train_time_s: float = 0.0
  best_train_pgd: float = -1.0   # early stopping: best train PGD accuracy so far ...
  best_step: int = 0             # ... and the iteration of those weights
  best_test_pgd: float = -1.0    # catastrophic-overfitting flag: best test PGD accuracy ...
  alignment_at_best: float = 0.0  # ... and the gradient alignment at that point
  co_step: int = -1              # first iteration flagged as catastrophic overfitting, or -1

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "RunRecord":
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    return cls(**{k: (int(v) if fields[k] == "int" else float(v)) for k, v in d.items()
                  if k in fields})


def track_catastrophic_overfitting(record: RunRecord, config: ml_collections.ConfigDict,
                                   step: int, pgd_acc: float, alignment: float) -> bool:
  """Updates `record` with one diagnostic; True when catastrophic overfitting is first detected.

  Detected when test PGD accuracy falls below `co_pgd_drop` x its best so far (itself at least
  `co_min_best_pgd`) while the gradient alignment falls below `co_alignment_drop` x its value at
  that best point: the signature of SPEC §4 (PGD collapses, alignment drops).
  """
  if pgd_acc > record.best_test_pgd:
    record.best_test_pgd, record.alignment_at_best = pgd_acc, alignment
    return False
  if (record.co_step < 0 and record.best_test_pgd >= config.co_min_best_pgd
      and pgd_acc < config.co_pgd_drop * record.best_test_pgd
      and alignment < config.co_alignment_drop * record.alignment_at_best):
    record.co_step = step
    return True
  return False


class Monitor:
  """Diagnostics every `eval_every` iterations on fixed train and test points (SPEC §4)."""

  def __init__(self, config: ml_collections.ConfigDict, evaluator: evaluation.Evaluator,
               train_split: datasets.Split, test_split: datasets.Split, rng: jax.Array,
               record: RunRecord, best: Any):
    self.config, self.evaluator, self.rng = config, evaluator, rng
    self.record = record
    self.best = best  # the early-stopped variables (host)
    self.train_points = datasets.fixed_subset(train_split, config.n_eval_points, config.seed)
    self.test_points = datasets.fixed_subset(test_split, config.n_eval_points, config.seed + 1)

  def run(self, step: int, variables: Any) -> dict[str, float]:
    """One diagnostic: returns the metrics row and updates early stopping and the CO flag."""
    c = self.config
    # Always the full eps, also during an eps warm-up: early stopping and the overfitting flag
    # compare robustness across iterations, which needs one radius.
    eps = float(c.eps)
    rng = jax.random.fold_in(self.rng, step)
    te = self.evaluator.diagnostics(variables, *self.test_points, eps, rng, c.eval_pgd_steps)
    tr = self.evaluator.diagnostics(variables, *self.train_points, eps, rng, c.eval_pgd_steps)
    rec = {f"test_{k}": v for k, v in te.items()}
    rec.update({f"train_eval_{k}": v for k, v in tr.items()})
    rec["train_eval_reg"] = c.grad_align_lambda * (1.0 - tr["alignment"])
    rec["eval_eps"] = eps
    if tr["pgd_acc"] > self.record.best_train_pgd:  # early stopping (Wong et al.)
      self.record.best_train_pgd, self.record.best_step = tr["pgd_acc"], step
      self.best = jax.device_get(variables)
    if track_catastrophic_overfitting(self.record, c, step, te["pgd_acc"], te["alignment"]):
      logging.warning("Catastrophic overfitting at iteration %d: test PGD accuracy %.3f (best "
                      "%.3f), gradient alignment %.3f (was %.3f)", step, te["pgd_acc"],
                      self.record.best_test_pgd, te["alignment"], self.record.alignment_at_best)
    rec["catastrophic_overfitting"] = float(self.record.co_step >= 0)
    return rec

  def overfitting_summary(self) -> dict:
    co = self.record.co_step
    return {"catastrophic_overfitting": co >= 0,
            "catastrophic_overfitting_step": co if co >= 0 else None}
