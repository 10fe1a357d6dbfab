"""train_and_evaluate(config, workdir): the training loop, diagnostics, checkpoints, results.

Resumable: a rerun on the same workdir restores the latest checkpoint and continues. Everything
that varies along the run (data order, augmentation, attack noise, evaluation noise) is a pure
function of (seed, iteration), so a run killed and resumed ends with the same final metrics as
an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from fastadv_jax import checkpointing, config_validation, data, evaluation, metric_writers
from fastadv_jax import models, schedules, train_step
from fastadv_jax import train_state as ts


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the last checkpoint (all finite) is kept."""


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; warns when a resumed run's config differs from the stored one."""
  path = os.path.join(workdir, "config.json")
  now = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
      logging.warning("Config differs from the one stored in %s in: %s", path, changed)
  _write_json(path, now)


def fixed_subset(split: data.Split, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The same n points for every diagnostic evaluation of a run."""
  idx = np.sort(np.random.default_rng([seed, 12345]).permutation(len(split))[:n])
  return split.images[idx], split.labels[idx]


def _variables(rstate: ts.TrainState) -> dict:
  """Evaluation variables (device 0's copy) from the replicated state."""
  return jax.tree.map(lambda x: x[0], {"params": rstate.params,
                                       "batch_stats": rstate.batch_stats})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at_step: int | None = None) -> dict | None:
  """Trains, evaluates, writes metrics.jsonl / TensorBoard / checkpoints / results.json.

  `stop_at_step` ends the process-local run after that iteration without saving (as a kill
  would); it exists to test resumption. Returns the results dict, or None when stopped early.
  """
  devices = jax.local_devices()
  n_dev = len(devices)
  config_validation.validate_config(config, n_dev)
  os.makedirs(workdir, exist_ok=True)
  _record_config(config, workdir)
  wall_start = time.time()

  train_split = data.load_split(config.dataset, "train", config.data_dir, config.download)
  test_split = data.load_split(config.dataset, "test", config.data_dir, config.download)
  num_classes = data.NUM_CLASSES[config.dataset]
  spe = schedules.steps_per_epoch(len(train_split), config.batch_size)
  total = schedules.total_steps(config, spe)
  replay = config.free_replay if config.method == "free" else 1
  batches = data.TrainBatches(train_split, config.batch_size, config.seed)
  logging.info("%s: %d train / %d test examples, %d iterations (%d per epoch), %d device(s)",
               config.dataset, len(train_split), len(test_split), total, spe, n_dev)

  model = models.create_model(config, num_classes, bn_axis_name=train_step.AXIS)
  eval_model = models.create_model(config, num_classes, half_precision=False)
  init_rng, step_rng, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
  state = train_step.create_train_state(config, model, init_rng, train_split.images.shape[1:], spe)
  best = {"params": state.params, "batch_stats": state.batch_stats}
  meta: dict[str, Any] = {"train_time_s": 0.0, "best_train_pgd": -1.0, "best_step": 0,
                          "best_test_pgd": -1.0, "alignment_at_best": 0.0, "co_step": -1}

  ckpt = checkpointing.Checkpointer(workdir, config.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is not None:
    state, best, meta = ckpt.restore(latest, state, best)
    logging.info("Resumed from checkpoint at iteration %d", latest)
  start = int(state.step)
  writer = metric_writers.MetricWriter(workdir, resume_step=start)
  p_step = train_step.pmap_train_step(train_step.make_train_step(config, model, spe))
  rstate = ts.replicate(state, n_dev)
  del state
  evaluator = evaluation.Evaluator(eval_model, config.eval_batch_size)
  train_eval = fixed_subset(train_split, config.n_eval_points, config.seed)
  test_eval = fixed_subset(test_split, config.n_eval_points, config.seed + 1)

  pending: list[dict] = []
  pending_step = start
  last_train: dict[str, float] = {}

  def flush_train_metrics(s: int) -> dict[str, float]:
    nonlocal pending, pending_step, last_train
    if not pending:
      return last_train
    ms = jax.device_get(pending)
    for i, m in enumerate(ms):
      if not bool(np.all(m["finite"])):
        raise NonFiniteError(
            f"non-finite loss or gradient at iteration {pending_step + i + 1}; the last "
            f"checkpoint ({ckpt.latest_step()}) is kept. Lower lr_max, check the data, or "
            "disable half_precision.")
    avg = {k: float(np.mean([np.asarray(m[k])[0] for m in ms])) for k in ms[0] if k != "finite"}
    writer.write(s, s / spe, avg)
    pending, pending_step, last_train = [], s, avg
    return avg

  def save(s: int, seconds: float) -> None:
    flush_train_metrics(s)
    meta["train_time_s"] = seconds
    ckpt.save(s, ts.unreplicate(rstate), jax.device_get(best), meta)
    writer.flush()

  def diagnostics(s: int) -> dict[str, float]:
    nonlocal best
    variables = _variables(rstate)
    # Always the full eps, also during an eps warm-up: early stopping and the overfitting flag
    # compare robustness across iterations, which needs one radius.
    eps = float(config.eps)
    rng = jax.random.fold_in(eval_rng, s)
    te = evaluator.diagnostics(variables, *test_eval, eps, rng, config.eval_pgd_steps)
    tr = evaluator.diagnostics(variables, *train_eval, eps, rng, config.eval_pgd_steps)
    rec = {f"test_{k}": v for k, v in te.items()}
    rec.update({f"train_eval_{k}": v for k, v in tr.items()})
    rec["train_eval_reg"] = config.grad_align_lambda * (1.0 - tr["alignment"])
    rec["eval_eps"] = eps
    if tr["pgd_acc"] > meta["best_train_pgd"]:  # early stopping on train PGD accuracy (Wong et al.)
      meta["best_train_pgd"], meta["best_step"] = tr["pgd_acc"], s
      best = jax.device_get(variables)
    if track_catastrophic_overfitting(meta, config, s, te["pgd_acc"], te["alignment"]):
      logging.warning("Catastrophic overfitting at iteration %d (epoch %.2f): test PGD accuracy "
                      "%.3f (best %.3f), gradient alignment %.3f (was %.3f)", s, s / spe,
                      te["pgd_acc"], meta["best_test_pgd"], te["alignment"],
                      meta["alignment_at_best"])
    rec["catastrophic_overfitting"] = float(meta["co_step"] >= 0)
    writer.write(s, s / spe, rec)
    return rec

  bar = None
  if config.progress_bar:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, mininterval=1.0,
               desc=f"{config.method}{'+GA' if config.grad_align_lambda > 0 else ''}")

  # SIGTERM (preemption) behaves like Ctrl-C: checkpoint, then stop.
  prev_handler = None
  if hasattr(signal, "SIGTERM") and _in_main_thread():
    prev_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
  time_base = float(meta["train_time_s"])
  t0 = time.time()
  s = start
  try:
    for step in range(start, total):
      batch = batches.get(step // replay)
      batch = {k: v.reshape((n_dev, -1) + v.shape[1:]) for k, v in batch.items()}
      rstate, m = p_step(rstate, batch, step_rng)
      pending.append(m)
      s = step + 1
      if s == stop_at_step:
        jax.block_until_ready(rstate)
        logging.info("Stopping at iteration %d without saving (stop_at_step)", s)
        return None
      if s % config.log_every == 0 or s == total:
        avg = flush_train_metrics(s)
        if bar is not None:
          bar.set_postfix(loss=f"{avg['train_loss']:.3f}", acc=f"{avg['train_acc']:.3f}",
                          reg=f"{avg['train_reg']:.3f}", refresh=False)
      if s % config.eval_every == 0 or s == total:
        rec = diagnostics(s)
        if bar is not None:
          bar.write(f"[{s}/{total}] test clean {rec['test_clean_acc']:.3f} fgsm "
                    f"{rec['test_fgsm_acc']:.3f} pgd{config.eval_pgd_steps} "
                    f"{rec['test_pgd_acc']:.3f} align {rec['test_alignment']:.3f}")
      if s % config.checkpoint_every == 0 or s == total:
        save(s, time_base + time.time() - t0)
      if bar is not None:
        bar.update(1)
  except KeyboardInterrupt:
    if s > start and s != ckpt.latest_step():
      logging.warning("Interrupted: saving a checkpoint at iteration %d", s)
      save(s, time_base + time.time() - t0)
    raise
  finally:
    if bar is not None:
      bar.close()
    if prev_handler is not None:
      signal.signal(signal.SIGTERM, prev_handler)
  train_time = time_base + time.time() - t0

  results = final_evaluation(config, evaluator, _variables(rstate), best, meta, test_split,
                             eval_rng)
  results.update({
      "config": json.loads(config.to_json_best_effort()),
      "iterations": total, "epochs": config.num_epochs,
      "train_time_s": train_time, "wall_time_s": time.time() - wall_start,
      "devices": [str(d) for d in devices],
      "final_train_metrics": flush_train_metrics(total),
  })
  _write_json(os.path.join(workdir, "results.json"), results)
  writer.close()
  ckpt.close()
  logging.info("Results: clean %.4f, PGD-%d-%d %.4f on %d test points; written to %s",
               results["clean_acc"], results["pgd_steps"], results["pgd_restarts"],
               results["pgd_acc"], results["n_eval"], os.path.join(workdir, "results.json"))
  return results


def track_catastrophic_overfitting(meta: dict, config: ml_collections.ConfigDict, step: int,
                                   pgd_acc: float, alignment: float) -> bool:
  """Updates `meta` with one diagnostic; True when catastrophic overfitting is first detected.

  Detected when test PGD accuracy falls below `co_pgd_drop` x its best so far (itself at least
  `co_min_best_pgd`) while the gradient alignment falls below `co_alignment_drop` x its value at
  that best point: the signature of SPEC §4 (PGD collapses, alignment drops).
  """
  if pgd_acc > meta["best_test_pgd"]:
    meta["best_test_pgd"], meta["alignment_at_best"] = pgd_acc, alignment
    return False
  if (meta["co_step"] < 0 and meta["best_test_pgd"] >= config.co_min_best_pgd
      and pgd_acc < config.co_pgd_drop * meta["best_test_pgd"]
      and alignment < config.co_alignment_drop * meta["alignment_at_best"]):
    meta["co_step"] = step
    return True
  return False


def final_evaluation(config: ml_collections.ConfigDict, evaluator: evaluation.Evaluator,
                     variables: dict, best: dict, meta: dict, test_split: data.Split,
                     eval_rng: jax.Array) -> dict:
  """Clean and PGD-(final_pgd_steps)-(final_pgd_restarts) accuracy on the first n test points."""
  n = len(test_split) if config.n_final_eval == -1 else min(config.n_final_eval, len(test_split))
  x, y = test_split.images[:n], test_split.labels[:n]
  rng = jax.random.fold_in(eval_rng, -1 % (2**31))

  def evaluate(v):
    return {"clean_acc": evaluator.clean_accuracy(v, x, y),
            "pgd_acc": evaluator.robust_accuracy(v, x, y, config.eps, config.final_pgd_steps,
                                                 config.final_pgd_restarts, rng)}

  out = evaluate(variables)
  out.update({"eps": config.eps, "n_eval": n, "pgd_steps": config.final_pgd_steps,
              "pgd_restarts": config.final_pgd_restarts,
              "catastrophic_overfitting": meta["co_step"] >= 0,
              "catastrophic_overfitting_step": meta["co_step"] if meta["co_step"] >= 0 else None})
  if config.eval_early_stopped_model:
    out["best"] = {"iteration": int(meta["best_step"]),
                   "train_pgd_acc": float(meta["best_train_pgd"]), **evaluate(best)}
  return out


def _in_main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _raise_keyboard_interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt("SIGTERM")
