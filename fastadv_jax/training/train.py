"""train_and_evaluate(config, workdir): the training loop, checkpoints and results.

The data path reads one way: host batches (datasets.py) -> the pmapped step (train_step.py:
augmentation, perturbation, loss, update) -> monitoring (monitoring.py: diagnostics, early
stopping, overfitting flag) -> final evaluation (evaluation.py) -> results.json.

Resumable: a rerun on the same workdir restores the latest checkpoint and continues. Everything
that varies along the run (data order, augmentation, attack noise, evaluation noise) is a pure
function of (seed, iteration), so a run killed and resumed ends with the same final metrics as
an uninterrupted one. A rerun may change only the fields that change neither (workdir.py,
RESUME_SAFE_FIELDS), and a finished run is immutable (workdir.check_rerun).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Iterator

import jax
import ml_collections
from absl import logging
from tqdm import tqdm

from fastadv_jax import methods, parallel
from fastadv_jax.data import datasets
from fastadv_jax.runtime import cli_logging, distributed
from fastadv_jax.training import (checkpointing, config_validation, engines, evaluation,
                                  metric_writers, model_config, monitoring, preemption,
                                  run_plan, run_results, schedules, timing, train_metrics,
                                  train_step, weight_averaging, workdir)
from fastadv_jax.training import train_state as ts

class StartError(RuntimeError):
  """The run's first step could not run (out of memory, a plugin's error): one line, and the
  workdir stays free for another config while it holds no checkpoint (workdir.check_rerun)."""


@contextlib.contextmanager
def _first_step_failures(plan: run_plan.RunPlan, first: bool, resumed: bool
                         ) -> Iterator[None]:
  """Around this process's first step (traced, compiled and run there): what the user can
  fix, as one StartError line; anything else (a library bug) keeps its traceback."""
  if not first:
    yield
    return
  config = plan.config
  free = ("the checkpoint is kept" if resumed else
          "the workdir holds no checkpoint, so any config may be run in it")
  try:
    yield
  except methods.MethodOutputError as e:
    raise StartError(f"{e} ({free})") from None
  except Exception as e:  # pylint: disable=broad-except
    why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    if "RESOURCE_EXHAUSTED" in str(e) or isinstance(e, MemoryError):
      fix = ("free the device's memory (another process on it?), or train with a smaller "
             "config.batch_size in a new --workdir" if resumed else "lower the batch size")
      raise StartError(f"the first step ran out of memory with config.batch_size="
                       f"{config.batch_size} (model {config.model}): {why}; {fix} ({free})"
                       ) from None
    plugins_used = [f"{kind} {name!r} ({module})" for kind, name, module in _components(plan)
                    if not module.startswith("fastadv_jax")]
    if not plugins_used:
      raise
    raise StartError(f"the first step failed in {' or '.join(plugins_used)}: {why} "
                     f"({free}; FASTADV_VERBOSE=1 shows the traceback)") from (
                         e if cli_logging.verbose() else None)


def _components(plan: run_plan.RunPlan) -> list[tuple[str, str, str]]:
  """(kind, name, defining module) of the run's method and model."""
  return [("method", plan.method.name, plan.method.perturb.__module__),
          ("model", plan.model.name, plan.model.build.__module__)]


def _load_data(config: ml_collections.ConfigDict
               ) -> tuple[datasets.Split, datasets.Split, datasets.Split | None]:
  """The training, test and validation splits (the validation split, config.validation_size,
  is the end of the training one, held out; None without); a batch larger than what is left
  to train on is a config error (nothing written)."""
  c = config
  train_split = datasets.load_split(c.dataset, "train", c.data_dir, c.download)
  test_split = datasets.load_split(c.dataset, "test", c.data_dir, c.download)
  n_val = int(c.validation_size)
  if n_val >= len(train_split):
    raise config_validation.ConfigError(
        f"config.validation_size: {n_val} leaves no training example of the {len(train_split)} "
        f"of {c.dataset}")
  train_split, val_split = datasets.hold_out(train_split, n_val)
  if c.batch_size > len(train_split):
    held = f", {n_val} held out for validation" if n_val else ""
    raise config_validation.ConfigError(
        f"config.batch_size: {c.batch_size} is larger than the training set "
        f"({len(train_split)} examples of {c.dataset}{held})")
  return train_split, test_split, val_split


def _schedule(plan: run_plan.RunPlan, splits: tuple
              ) -> tuple[int, int, int, datasets.TrainBatches]:
  """(steps per epoch, iterations, replays of each batch, the batch order), logged once."""
  train_split, test_split, val_split = splits
  config = plan.config
  spe = schedules.steps_per_epoch(len(train_split), config.batch_size)
  total = schedules.total_steps(config, spe)
  replay = plan.method.replays(plan.method_args)
  held = "" if val_split is None else f" ({len(val_split)} held out for validation)"
  logging.info("%s: %d train%s / %d test examples, %d iterations (%d per epoch), %d device(s) "
               "in %d process(es)", config.dataset, len(train_split), held, len(test_split),
               total, spe, jax.device_count(), jax.process_count())
  return spe, total, replay, datasets.TrainBatches(train_split, config.batch_size, config.seed)


def _models(plan: run_plan.RunPlan) -> tuple[Any, Any]:
  """The training model (BatchNorm statistics shared over the device axis) and the float32
  one that evaluates."""
  return (model_config.create_model(plan, plan.num_classes, bn_axis_name=parallel.AXIS),
          model_config.create_model(plan, plan.num_classes, half_precision=False))


def _restore(ckpt: checkpointing.Checkpointer, engine: Any, config: ml_collections.ConfigDict,
             state: ts.TrainState) -> tuple[Any, dict, monitoring.RunRecord, int | None]:
  """The run continued from the latest checkpoint, if any, else from the fresh `state`: (the
  state laid over the devices as the engine runs it, the kept weights, the record, the
  checkpoint's iteration or None). One that does not fit says why, and how to resume it."""
  best, record = ts.variables(state), monitoring.RunRecord()
  try:
    restored = ckpt.restore_latest(engine.checkpoint_template(state), best)
  except checkpointing.CheckpointMismatch as e:
    try:
      cause = _mismatch_cause(ckpt, config)
    finally:
      ckpt.close()
    raise checkpointing.CheckpointMismatch(f"{e}: {cause}") from None
  except BaseException:
    ckpt.close()  # a refused checkpoint: nothing is left open at exit
    raise
  if restored is None:
    return engine.place_state(state), best, record, None
  latest, state, best, meta = restored
  logging.info("Resumed from checkpoint at iteration %d", latest)
  return engine.restored(state), best, monitoring.RunRecord.from_json(meta), latest


def _mismatch_cause(ckpt: checkpointing.Checkpointer, config: ml_collections.ConfigDict) -> str:
  """Why the latest checkpoint does not fit this config, from what it was written with."""
  try:
    written = ckpt.meta(ckpt.latest_step()).get(workdir.WRITTEN_WITH)
    return workdir.mismatch_cause(written, config)
  except Exception:  # pylint: disable=broad-except  # an unreadable record: the generic advice
    return workdir.mismatch_cause(None, config)


def _weights(engine: Any, rstate: ts.TrainState) -> tuple[dict, dict | None]:
  """Evaluation variables (device 0's copy) of the state, and of its weight average (None
  without one)."""
  last = ts.variables(rstate)
  averaged = (None if rstate.ema is None
              else engine.first(weight_averaging.variables(rstate.ema, last)))
  return engine.first(last), averaged


def _due(s: int, every: int, total: int) -> bool:
  """Whether iteration s logs / runs diagnostics / checkpoints: every `every` and the last."""
  return s % every == 0 or s == total


def _interrupted_step(why: KeyboardInterrupt, engine: Any, rstate: Any, start: int,
                      saved_step: int | None) -> int | None:
  """The iteration to checkpoint on Ctrl-C / SIGTERM: the iterations the state has seen, when
  that is more than the run started from and not saved yet; None to keep the last checkpoint.
  In a multi-process run only a stop every process agreed on saves (the others join the save);
  a process stopped alone (a second signal) keeps the last checkpoint."""
  if jax.process_count() > 1 and not isinstance(why, preemption.StopRequested):
    kept = "none saved yet" if saved_step is None else f"iteration {saved_step}"
    logging.warning("Stopped this process alone; the last checkpoint (%s) is kept", kept)
    return None
  try:
    done = engine.step_of(rstate)
  except RuntimeError:  # a second signal inside a step: its donated input state is gone
    logging.warning("Interrupted inside a step; the last checkpoint is kept")
    raise
  if done > start and done != saved_step:
    logging.warning("Interrupted: saving a checkpoint at iteration %d", done)
    return done
  return None


class _Records:
  """What a run writes at iteration boundaries: metrics.jsonl's training rows, the diagnostics
  and the checkpoints, with the bookkeeping they share (the monitor's record, the last saved
  iteration). The state to diagnose or save is the loop's, passed in."""

  def __init__(self, config: ml_collections.ConfigDict, engine: Any,
               ckpt: checkpointing.Checkpointer, writer: metric_writers.MetricWriter,
               monitor: monitoring.Monitor, metrics: train_metrics.TrainMetrics, spe: int,
               total: int, saved_step: int | None):
    self.config, self.engine, self.ckpt, self.writer = config, engine, ckpt, writer
    self.monitor, self.metrics, self.spe, self.total = monitor, metrics, spe, total
    self.saved_step = saved_step

  def close(self) -> None:
    """Closes the writers and the checkpoint manager (also after an error: no noise at exit)."""
    self.writer.close()
    self.ckpt.close()

  def flush(self, s: int) -> dict[str, float]:
    """Writes the training row of iteration s (TrainMetrics.flush) and returns it."""
    return self.metrics.flush(s, self.monitor.record, self.saved_step)

  def save(self, s: int, rstate: Any, train_time_s: float) -> None:
    """Checkpoints iteration s. Between two log rows (an interruption) the pending per-step
    metrics go into the checkpoint instead of a row of their own."""
    record = self.monitor.record
    if _due(s, self.config.log_every, self.total):
      self.flush(s)
      record.pending_train_metrics = []
    else:
      record.pending_train_metrics = self.metrics.for_checkpoint(self.saved_step)
    record.train_time_s = train_time_s
    self.ckpt.save(s, self.engine.to_checkpoint(rstate), jax.device_get(self.monitor.best),
                   {**record.to_json(), workdir.WRITTEN_WITH: workdir.written_with(self.config)})
    self.saved_step = s
    self.writer.flush()

  def diagnose(self, s: int, rstate: Any) -> dict[str, float]:
    """Diagnostics of iteration s. An interruption inside leaves the record as it was before
    (the checkpoint then says they are still due, and a resumed run runs them first)."""
    before = (dataclasses.replace(self.monitor.record), self.monitor.best)
    try:
      rec = self.monitor.run(s, *_weights(self.engine, rstate))
      self.writer.write(s, s / self.spe, rec)
      self.monitor.record.diagnosed_step = s
    except BaseException:
      self.monitor.record, self.monitor.best = before
      raise
    return rec


class _Run:
  """One training run, built from its stages (schedule, models, state restored or fresh,
  writers, compiled step, evaluator, monitor); `train` loops, `finish` writes results.json."""

  def __init__(self, plan: run_plan.RunPlan, workdir_: str,
               splits: tuple[datasets.Split, datasets.Split, datasets.Split | None]):
    config = plan.config
    self.plan, self.config, self.workdir, self.wall_start = plan, config, workdir_, time.time()
    self.engine = engines.create(config.parallelism)
    self.stop: preemption.StopOnSignal | None = None  # the training loop's (train)
    self.train_split, self.test_split, self.val_split = splits
    self.spe, self.total, self.replay, self.batches = _schedule(plan, splits)
    model, eval_model = _models(plan)
    # The run's initialisation, step and evaluation keys, split from config.seed at once.
    init_rng, self.step_rng, self.eval_rng = jax.random.split(jax.random.key(config.seed), 3)
    state = ts.create_train_state(plan, model, init_rng, self.train_split.images.shape[1:],
                                  self.spe, n_examples=len(self.train_split))
    self.ckpt = checkpointing.Checkpointer(workdir_, config.keep_checkpoints,
                                           global_arrays=self.engine.global_arrays)
    # The latest checkpoint is the run's own, the same on every process (a process other than
    # 0 writes none, and does not see process 0's). metrics.jsonl is cut back to `start`.
    self.rstate, best, record, saved_step = _restore(self.ckpt, self.engine, config, state)
    self.start = self.engine.step_of(self.rstate)
    self.writer = metric_writers.MetricWriter(workdir_, resume_step=self.start,
                                              enabled=distributed.is_main())
    self.p_step = self.engine.compile_step(train_step.make_train_step(plan, model, self.spe))
    self.evaluator = evaluation.Evaluator(eval_model, config.eval_batch_size,
                                          step_alpha=config.eval_step_alpha)
    self.monitor = monitoring.Monitor(config, self.evaluator, self.train_split, self.test_split,
                                      self.eval_rng, record, best, val_split=self.val_split)
    self.metrics = train_metrics.TrainMetrics(self.writer, self.spe,
                                              record.pending_train_metrics, self.start)
    self.records = _Records(config, self.engine, self.ckpt, self.writer, self.monitor,
                            self.metrics, self.spe, self.total, saved_step)

  def close(self) -> None:
    self.records.close()

  def step(self, step: int) -> Any:
    """Runs iteration `step` and its logging, diagnostics and checkpoint. In a multi-process
    run the batch carries this process's stop flag (`self.stop`, set by `train`) and the step
    returns every process's maximum (preemption.py), which is returned here, not logged."""
    batch = self.batches.get(step // self.replay)
    flags = None if self.stop is None else self.stop.batch_flags(len(batch["label"]))
    if flags is not None:
      batch = dict(batch, stop=flags)
    with _first_step_failures(self.plan, step == self.start,
                              self.records.saved_step is not None):
      self.rstate, m = self.p_step(self.rstate, self.engine.place_batch(batch), self.step_rng)
      m = dict(self.engine.local_metrics(m))
    agreement = m.pop("stop", None)
    self.metrics.append(m)
    self.clocks.stepped(self.rstate, self.monitor.record)
    s, c = step + 1, self.config
    if _due(s, c.log_every, self.total):
      self.progress.train(self.records.flush(s))
    diagnose = _due(s, c.eval_every, self.total)
    checkpoint = _due(s, c.checkpoint_every, self.total)
    if diagnose or checkpoint:
      self.clocks.pause(self.rstate, self.monitor.record)
      if diagnose:
        self.progress.diagnostics(s, self.records.diagnose(s, self.rstate))
      if checkpoint:
        self.records.save(s, self.rstate, self.clocks.train.seconds())
      self.clocks.steps.start()
    self.progress.update()
    return agreement

  def train(self) -> float:
    """The loop; Ctrl-C and SIGTERM save a checkpoint first (in a multi-process run, of an
    iteration all processes agree on: preemption.py). A resumed run first runs the diagnostics
    its checkpoint's iteration missed. Returns the training time."""
    self.clocks = timing.RunClocks(self.monitor.record.train_time_s)
    self.progress = _Progress(self.config, self.total, self.start, distributed.is_main())
    try:
      with preemption.StopOnSignal() as stop:
        self.stop = stop
        s, record = self.start, self.monitor.record
        if s > 0 and _due(s, self.config.eval_every, self.total) and record.diagnosed_step < s:
          logging.info("Running the diagnostics of iteration %d that the interrupted run missed",
                       s)
          self.records.diagnose(s, self.rstate)
        for step in range(self.start, self.total):
          agreement = self.step(step)
          stop.check(step + 1, agreement)  # a signal stops the run here, between iterations
          if step > self.start:  # the check read the previous step's agreement: it completed
            distributed.made_progress()
        stop.finish(self.total)
        distributed.made_progress()  # also a run with no step left, or a single step
    except KeyboardInterrupt as e:
      self._save_interrupted(e)
      raise
    finally:
      self.progress.close()
    return self.clocks.train.seconds()

  def _save_interrupted(self, why: KeyboardInterrupt) -> None:
    """On Ctrl-C / SIGTERM: checkpoints the iterations done since the last checkpoint, if
    `_interrupted_step` says so."""
    done = _interrupted_step(why, self.engine, self.rstate, self.start, self.records.saved_step)
    if done is not None:
      self.records.save(done, self.rstate, self.clocks.train.seconds())

  def finish(self, train_time: float) -> dict:
    """Final evaluation of the last, the kept and the averaged weights; writes results.json."""
    results = run_results.final_evaluation(
        self.config, self.evaluator, self.monitor, *_weights(self.engine, self.rstate),
        self.test_split, self.eval_rng, self.total)
    results.update(run_results.run_summary(self.plan, self.monitor.record, self.total,
                                           train_time, self.wall_start,
                                           self.records.flush(self.total)))
    if distributed.is_main():
      workdir.write_json(os.path.join(self.workdir, "results.json"), results)
    run_results.log_results(results, self.workdir)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir_: str) -> dict:
  """Trains, evaluates, writes metrics.jsonl / TensorBoard / checkpoints / results.json.

  Bad input fails before the workdir is touched: the config is checked, then what the workdir
  holds (workdir.check_rerun: a recorded run's config may change only the resume-safe fields,
  and every file the run writes must be writable), the data loaded, the workdir created and
  locked (one run per workdir), the workdir checked again under the lock (a run that started
  meanwhile), and the latest checkpoint restored (one that does not fit the config is refused)
  before config.json is written.

  A finished run (results.json) is immutable: a rerun computes and writes nothing and returns
  its recorded results.
  """
  config_validation.validate_config(config, jax.device_count())
  main = distributed.is_main()
  recorded = workdir.check_rerun(config, workdir_, writes=main)
  if recorded is not None:
    return _finished(recorded, workdir_)
  splits = _load_data(config)
  if main:
    workdir.prepare(workdir_)
  distributed.barrier("workdir")  # the other processes open it once process 0 has made it
  with workdir.Lock(workdir_, enabled=main):
    recorded = workdir.check_rerun(config, workdir_, writes=main)
    if recorded is not None:  # another run finished it while this one waited for the data
      return _finished(recorded, workdir_)
    run = _Run(run_plan.resolve(config), workdir_, splits)
    try:
      if main:
        workdir.record_config(config, workdir_)
      train_time = run.train()
      with preemption.SigtermAsInterrupt():
        return run.finish(train_time)
    finally:
      run.close()


def _finished(results: dict, workdir_: str) -> dict:
  """A rerun of a finished run: its recorded results, logged, and nothing written."""
  logging.info("%s holds a finished run; its results.json is kept as it is (python -m "
               "fastadv_jax.evaluate evaluates it again; move results.json away to redo the "
               "final evaluation)", workdir_)
  if "clean_acc" in results and "n_eval" in results:
    run_results.log_results(results, workdir_)
  return results


class _Progress:
  """The tqdm bar (config.progress_bar) with the latest training and diagnostic numbers."""

  def __init__(self, config: ml_collections.ConfigDict, total: int, start: int,
               enabled: bool = True):
    self.config, self.total, self.bar = config, total, None
    if config.progress_bar and enabled:
      ga = "+GA" if config.grad_align_lambda > 0 else ""
      self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True,
                      mininterval=1.0, desc=f"{config.method}{ga}")

  def train(self, avg: dict[str, float]) -> None:
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{avg['train_loss']:.3f}", acc=f"{avg['train_acc']:.3f}",
                           reg=f"{avg['train_reg']:.3f}", refresh=False)

  def diagnostics(self, s: int, rec: dict[str, float]) -> None:
    if self.bar is not None:
      name = "test" if "test_clean_acc" in rec else "val"  # validation selection: no test
      line = (f"[{s}/{self.total}] {name} clean {rec[f'{name}_clean_acc']:.3f} fgsm "
              f"{rec[f'{name}_fgsm_acc']:.3f} pgd{self.config.eval_pgd_steps} "
              f"{rec[f'{name}_pgd_acc']:.3f} align {rec[f'{name}_alignment']:.3f}")
      if f"{name}_pgd_acc_avg" in rec:
        line += (f" | averaged clean {rec[f'{name}_clean_acc_avg']:.3f} pgd"
                 f"{self.config.eval_pgd_steps} {rec[f'{name}_pgd_acc_avg']:.3f}")
      self.bar.write(line)

  def update(self) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
