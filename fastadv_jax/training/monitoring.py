"""Watching a run: periodic diagnostics, early stopping and the catastrophic-overfitting flag.

`RunRecord` is the run's bookkeeping (saved with every checkpoint, so a resumed run continues
it); `Monitor.run(step, variables, averaged)` evaluates the fixed diagnostic points (and the
validation split) with the raw and the averaged weights, and updates it: early stopping on the
train points, or the selection between raw and averaged weights on the validation split
(config.selection).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from absl import logging

from fastadv_jax.data import datasets
from fastadv_jax.training import evaluation


@dataclasses.dataclass
class RunRecord:
  """What a run remembers across checkpoints besides its weights."""
  train_time_s: float = 0.0
  best_train_pgd: float = -1.0   # early stopping: best train PGD accuracy so far ...
  best_step: int = 0             # ... and the iteration of those weights
  best_test_pgd: float = -1.0    # catastrophic-overfitting flag: best test PGD accuracy ...
  alignment_at_best: float = 0.0  # ... and the gradient alignment at that point
  co_step: int = -1              # first iteration flagged as catastrophic overfitting, or -1
  co_signature: str = ""         # which signature fired: "pgd_collapse" or "fgsm_gap"
  step_seconds: float = 0.0      # time in training steps alone (no compilation, diagnostics,
  timed_steps: int = 0           # checkpoints), over this many steps: the per-step cost
  diagnosed_step: int = 0        # the last iteration whose diagnostics were written
  last_train_metrics: dict = dataclasses.field(default_factory=dict)  # the last logged averages
  # Validation selection (config.selection = "validation"): the kept weights' validation PGD
  # and clean accuracy, and which weights they are ("raw" or "averaged"); best_step is their
  # iteration.
  best_val_pgd: float = -1.0
  best_val_clean: float = -1.0
  selected: str = ""
  # Per-step metrics since the last log row when a checkpoint falls between two rows (an
  # interruption): a resumed run averages them into its next row, as the uninterrupted one does.
  pending_train_metrics: list = dataclasses.field(default_factory=list)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "RunRecord":
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    cast = {"int": int, "float": float, "str": str, "dict": dict, "list": list}
    return cls(**{k: cast[fields[k]](v) for k, v in d.items() if k in fields})


def track_catastrophic_overfitting(record: RunRecord, config: ml_collections.ConfigDict,
                                   step: int, pgd_acc: float, alignment: float,
                                   fgsm_acc: float | None = None) -> bool:
  """Updates `record` with one diagnostic; True when catastrophic overfitting is first detected.

  Two signatures (docs/algorithms.md §4.4; the paper's Figures 1 and 4), the first one that fires is recorded:
  - "pgd_collapse": test PGD accuracy falls below `co_pgd_drop` x its best so far (itself at
    least `co_min_best_pgd`) while the gradient alignment falls below `co_alignment_drop` x its
    value at that best point. Needs an earlier robust point.
  - "fgsm_gap": FGSM accuracy exceeds PGD accuracy by at least `co_fgsm_pgd_gap`: the
    single-step attack no longer finds the adversarial examples that PGD finds. Catches a run
    that collapsed before its first diagnostic, which the first signature cannot. It does not
    ask for a low gradient alignment: GradAlign keeps the alignment at random points high by
    construction and can still collapse (seen in EXPERIMENTS.md, alignment 0.70 with FGSM 73 %
    and PGD 1 %). On the 108 runs of the Fashion-MNIST method study a gap of 0.3 separated the
    runs: every run it flagged ended at most 23 % PGD-50-10 accuracy, every other one at least
    17.7 % (at eps >= 48/255).
  """
  signature = ""
  if pgd_acc > record.best_test_pgd:
    record.best_test_pgd, record.alignment_at_best = pgd_acc, alignment
  elif (record.best_test_pgd >= config.co_min_best_pgd
        and pgd_acc < config.co_pgd_drop * record.best_test_pgd
        and alignment < config.co_alignment_drop * record.alignment_at_best):
    signature = "pgd_collapse"
  if not signature and fgsm_acc is not None and fgsm_acc - pgd_acc >= config.co_fgsm_pgd_gap:
    signature = "fgsm_gap"
  if signature and record.co_step < 0:
    record.co_step, record.co_signature = step, signature
    return True
  return False


class Monitor:
  """Diagnostics every `eval_every` iterations on fixed train and test points and the validation
  split (docs/algorithms.md §4.2), for the raw weights and, with weight averaging, the averaged
  ones (keys with the suffix `_avg`)."""

  def __init__(self, config: ml_collections.ConfigDict, evaluator: evaluation.Evaluator,
               train_split: datasets.Split, test_split: datasets.Split, rng: jax.Array,
               record: RunRecord, best: Any, val_split: datasets.Split | None = None):
    self.config, self.evaluator, self.rng = config, evaluator, rng
    self.record = record
    self.best = best  # the early-stopped or validation-selected variables (host)
    self.train_points = datasets.fixed_subset(train_split, config.n_eval_points, config.seed)
    self.test_points = datasets.fixed_subset(test_split, config.n_eval_points, config.seed + 1)
    # all of the validation split, in order (the benchmark's 1000 points)
    self.val_points = None if val_split is None else (val_split.images, val_split.labels)
    self.validation_selection = config.selection == "validation"

  def run(self, step: int, variables: Any, averaged: Any = None) -> dict[str, float]:
    """One diagnostic of the raw `variables` and the `averaged` ones (None: no weight
    averaging): returns the metrics row and updates early stopping or the validation
    selection, and the CO flag. With validation selection the test points are not evaluated:
    the test set is seen once, by the final evaluation."""
    c = self.config
    # Always the full eps, also during an eps warm-up: early stopping and the overfitting flag
    # compare robustness across iterations, which needs one radius.
    eps = float(c.eps)
    rng = jax.random.fold_in(self.rng, step)
    rec, diag = {}, {}
    for suffix, v in (("", variables), ("_avg", averaged)):
      if v is None:
        continue
      sets = [("train_eval", self.train_points)]
      if not self.validation_selection:
        sets.insert(0, ("test", self.test_points))
      if self.val_points is not None:
        sets.append(("val", self.val_points))
      for name, points in sets:
        d = self.evaluator.diagnostics(v, *points, eps, rng, c.eval_pgd_steps)
        diag[name + suffix] = d
        rec.update({f"{name}_{k}{suffix}": x for k, x in d.items()})
        if name == "train_eval":
          rec[f"train_eval_reg{suffix}"] = c.grad_align_lambda * (1.0 - d["alignment"])
    rec["eval_eps"] = eps
    if self.validation_selection:
      self._select(step, variables, averaged, diag)
    elif diag["train_eval"]["pgd_acc"] > self.record.best_train_pgd:  # early stopping (Wong)
      self.record.best_train_pgd, self.record.best_step = diag["train_eval"]["pgd_acc"], step
      self.best = jax.device_get(variables)
    co = diag["val" if self.validation_selection else "test"]
    if track_catastrophic_overfitting(self.record, c, step, co["pgd_acc"], co["alignment"],
                                      co["fgsm_acc"]):
      logging.warning("Catastrophic overfitting (%s) at iteration %d: %s PGD accuracy %.3f "
                      "(best %.3f), FGSM accuracy %.3f, gradient alignment %.3f (%.3f at the "
                      "best PGD point)", self.record.co_signature, step,
                      "validation" if self.validation_selection else "test", co["pgd_acc"],
                      self.record.best_test_pgd, co["fgsm_acc"], co["alignment"],
                      self.record.alignment_at_best)
    rec["catastrophic_overfitting"] = float(self.record.co_step >= 0)
    return rec

  def _select(self, step: int, variables: Any, averaged: Any, diag: dict) -> None:
    """The benchmark's rule: of the raw and averaged weights, the one with the higher
    validation PGD accuracy (tie: raw) is kept if its PGD beats the best so far (tie: a higher
    clean accuracy)."""
    name, d, v = "raw", diag["val"], variables
    if averaged is not None and diag["val_avg"]["pgd_acc"] > d["pgd_acc"]:
      name, d, v = "averaged", diag["val_avg"], averaged
    r = self.record
    if d["pgd_acc"] > r.best_val_pgd or (d["pgd_acc"] == r.best_val_pgd
                                         and d["clean_acc"] > r.best_val_clean):
      r.best_val_pgd, r.best_val_clean, r.best_step, r.selected = (
          d["pgd_acc"], d["clean_acc"], step, name)
      self.best = jax.device_get(v)

  def overfitting_summary(self) -> dict:
    co = self.record.co_step
    return {"catastrophic_overfitting": co >= 0,
            "catastrophic_overfitting_step": co if co >= 0 else None,
            "catastrophic_overfitting_signature": self.record.co_signature or None}
