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
import numpy as np
from absl import logging
from tqdm import tqdm

from fastadv_jax import methods, models, parallel
from fastadv_jax.data import datasets
from fastadv_jax.runtime import cli_logging, distributed
from fastadv_jax.training import (checkpointing, config_validation, engines, evaluation,
                                  metric_writers, model_config, monitoring, preemption, schedules,
                                  timing, train_step, weight_averaging, workdir)
from fastadv_jax.training import train_state as ts

class StartError(RuntimeError):
  """The run's first step could not run (out of memory, a plugin's error): one line, and the
  workdir stays free for another config while it holds no checkpoint (workdir.check_rerun)."""


@contextlib.contextmanager
def _first_step_failures(config: ml_collections.ConfigDict, first: bool, resumed: bool
                         ) -> Iterator[None]:
  """Around this process's first step (traced, compiled and run there): what the user can
  fix, as one StartError line; anything else (a library bug) keeps its traceback."""
  if not first:
    yield
    return
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
    plugins_used = [f"{kind} {name!r} ({module})" for kind, name, module in _components(config)
                    if not module.startswith("fastadv_jax")]
    if not plugins_used:
      raise
    raise StartError(f"the first step failed in {' or '.join(plugins_used)}: {why} "
                     f"({free}; FASTADV_VERBOSE=1 shows the traceback)") from (
                         e if cli_logging.verbose() else None)


def _components(config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
  """(kind, name, defining module) of the run's method and model."""
  return [("method", config.method, methods.get(config.method).perturb.__module__),
          ("model", config.model, models.get(config.model).build.__module__)]


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the last checkpoint (all finite) is kept."""


def _load_data(config: ml_collections.ConfigDict
               ) -> tuple[datasets.Split, datasets.Split, datasets.Split | None]:
  """The training, test and validation splits (the validation split, config.validation_size,
  is the end of the training one, held out; None without); a batch larger than what is left
  to train on is a config error (nothing written)."""
  c = config
  train_split = datasets.load_split(c.dataset, "train", c.data_dir, c.download)
  test_split = datasets.load_split(c.dataset, "test", c.data_dir, c.download)
  n_val = int(c.get("validation_size", 0))
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


class _Run:
  """One training run. Its construction reads as the stages below (data and schedule, models,
  initial state, restore, writers, step function, evaluator and monitor); `train` and `finish`
  are the stages of `train_and_evaluate` after it."""

  def __init__(self, config: ml_collections.ConfigDict, workdir_: str,
               splits: tuple[datasets.Split, datasets.Split, datasets.Split | None]):
    self.config, self.workdir, self.wall_start = config, workdir_, time.time()
    self.engine = engines.create(config.get("parallelism", "pmap"))
    self.stop: preemption.StopOnSignal | None = None  # the training loop's (train)
    self._data_and_schedule(splits)
    model, eval_model = self._models()
    self.rstate, best, record = self._restore(*self._initial_state(model))
    self._open_writers()
    self._step_function(model)
    self._evaluator_and_monitor(eval_model, record, best)

  def _data_and_schedule(self, splits: tuple[datasets.Split, datasets.Split,
                                              datasets.Split | None]) -> None:
    """The splits, the batch order and the iteration counts (logged once)."""
    c = self.config
    self.train_split, self.test_split, self.val_split = splits
    self.spe = schedules.steps_per_epoch(len(self.train_split), c.batch_size)
    self.total = schedules.total_steps(c, self.spe)
    method = methods.get(c.method)
    self.replay = method.replays(method.args_from(c))
    self.batches = datasets.TrainBatches(self.train_split, c.batch_size, c.seed)
    held = ("" if self.val_split is None
            else f" ({len(self.val_split)} held out for validation)")
    logging.info("%s: %d train%s / %d test examples, %d iterations (%d per epoch), %d device(s) "
                 "in %d process(es)", c.dataset, len(self.train_split), held,
                 len(self.test_split), self.total, self.spe, jax.device_count(),
                 jax.process_count())

  def _models(self) -> tuple[Any, Any]:
    """The training model (BatchNorm statistics shared over the device axis) and the float32
    one that evaluates."""
    c = self.config
    num_classes = datasets.NUM_CLASSES[c.dataset]
    return (model_config.create_model(c, num_classes, bn_axis_name=parallel.AXIS),
            model_config.create_model(c, num_classes, half_precision=False))

  def _initial_state(self, model: Any) -> tuple[ts.TrainState, dict, monitoring.RunRecord]:
    """A fresh run's state, early-stopped (or selected) weights and record; also the run's step and
    evaluation keys (all three keys are split from config.seed at once)."""
    c = self.config
    init_rng, self.step_rng, self.eval_rng = jax.random.split(jax.random.key(c.seed), 3)
    state = ts.create_train_state(c, model, init_rng, self.train_split.images.shape[1:], self.spe,
                                  n_examples=len(self.train_split))
    return state, ts.variables(state), monitoring.RunRecord()

  def _restore(self, state: ts.TrainState, best: dict, record: monitoring.RunRecord
               ) -> tuple[ts.TrainState, dict, monitoring.RunRecord]:
    """Opens the checkpoint manager and continues from its latest checkpoint, if any; the
    fresh state and record otherwise. Returns the state laid over the devices as the engine
    runs it. Sets `start`, the first iteration to run."""
    self.ckpt = checkpointing.Checkpointer(self.workdir, self.config.keep_checkpoints,
                                           global_arrays=self.engine.global_arrays)
    try:
      restored = self.ckpt.restore_latest(self.engine.checkpoint_template(state), best)
    except checkpointing.CheckpointMismatch as e:  # does not fit: say why, and how to resume
      try:
        cause = self._mismatch_cause()
      finally:
        self.ckpt.close()
      raise checkpointing.CheckpointMismatch(f"{e}: {cause}") from None
    except BaseException:
      self.ckpt.close()  # a refused checkpoint: nothing is left open at exit
      raise
    if restored is not None:
      latest, state, best, meta = restored
      record = monitoring.RunRecord.from_json(meta)
      logging.info("Resumed from checkpoint at iteration %d", latest)
      placed = self.engine.restored(state)
    else:
      placed = self.engine.place_state(state)
    self.start = self.engine.step_of(placed)
    # The latest checkpoint, kept by the run itself: the same on every process (a process other
    # than 0 writes none, and its checkpoint manager does not see process 0's).
    self.saved_step = None if restored is None else restored[0]
    return placed, best, record

  def _mismatch_cause(self) -> str:
    """Why the latest checkpoint does not fit this config, from what it was written with."""
    try:
      written = self.ckpt.meta(self.ckpt.latest_step()).get(workdir.WRITTEN_WITH)
      return workdir.mismatch_cause(written, self.config)
    except Exception:  # pylint: disable=broad-except  # an unreadable record: the generic advice
      return workdir.mismatch_cause(None, self.config)

  def _open_writers(self) -> None:
    """metrics.jsonl / TensorBoard, cut back to `start` (rows of iterations a resumed run
    repeats are dropped); process 0 alone writes."""
    self.writer = metric_writers.MetricWriter(self.workdir, resume_step=self.start,
                                              enabled=distributed.is_main())

  def _step_function(self, model: Any) -> None:
    """The training step compiled by the engine (pmap or jit + shard_map)."""
    self.p_step = self.engine.compile_step(
        train_step.make_train_step(self.config, model, self.spe))

  def _evaluator_and_monitor(self, eval_model: Any, record: monitoring.RunRecord,
                             best: dict) -> None:
    """The float32 evaluator, the monitor (diagnostics, early stopping, overfitting flag) that
    keeps `record` and `best`, and the per-step metrics not yet in a log row (a resumed run
    starts with the ones its checkpoint saved)."""
    c = self.config
    self.evaluator = evaluation.Evaluator(eval_model, c.eval_batch_size,
                                          step_alpha=c.eval_step_alpha)
    self.monitor = monitoring.Monitor(c, self.evaluator, self.train_split, self.test_split,
                                      self.eval_rng, record, best, val_split=self.val_split)
    self.pending: list[dict] = [
        {k: np.asarray([v], dtype=dtype) for k, (v, dtype) in m.items()}
        for m in record.pending_train_metrics]
    self.pending_step = self.start - len(self.pending)

  def close(self) -> None:
    """Flushes and closes the writers and the checkpoint manager (also after an error, so no
    library complains at exit)."""
    self.writer.close()
    self.ckpt.close()

  @property
  def variables(self) -> dict:
    """Evaluation variables (device 0's copy) of the replicated state."""
    return self.engine.first(ts.variables(self.rstate))

  @property
  def averaged_variables(self) -> dict | None:
    """Evaluation variables of the weight average (device 0's copy), or None without one."""
    if self.rstate.ema is None:
      return None
    return self.engine.first(weight_averaging.variables(self.rstate.ema,
                                                        ts.variables(self.rstate)))

  def _checked(self) -> list[dict]:
    """The pending per-step metrics on the host; raises NonFiniteError on NaN/Inf."""
    ms = jax.device_get(self.pending)
    for i, m in enumerate(ms):
      if not bool(np.all(m["finite"])):
        raise NonFiniteError(
            f"non-finite loss or gradient at iteration {self.pending_step + i + 1}; the last "
            f"checkpoint ({self.saved_step}) is kept. Lower lr_max, check the data, or "
            "disable half_precision, in a new --workdir (a run keeps its config).")
    return ms

  def flush_train_metrics(self, s: int) -> dict[str, float]:
    """Averages the metrics since the last flush, checks them for NaN/Inf, writes them."""
    if not self.pending:
      return self.monitor.record.last_train_metrics
    ms = self._checked()
    avg = {k: float(np.mean([np.asarray(m[k])[0] for m in ms])) for k in ms[0] if k != "finite"}
    self.writer.write(s, s / self.spe, avg)
    self.pending, self.pending_step = [], s
    self.monitor.record.last_train_metrics = avg  # saved with the checkpoint, for results.json
    return avg

  def save(self, s: int, train_time_s: float) -> None:
    """Checkpoints iteration s. Between two log rows (an interruption) the pending per-step
    metrics go into the checkpoint instead of a row of their own."""
    record = self.monitor.record
    if self.due(s, self.config.log_every):
      self.flush_train_metrics(s)
      record.pending_train_metrics = []
    else:
      record.pending_train_metrics = [
          {k: [np.asarray(v)[0].item(), str(np.asarray(v).dtype)] for k, v in m.items()}
          for m in self._checked()]
    record.train_time_s = train_time_s
    self.ckpt.save(s, self.engine.to_checkpoint(self.rstate), jax.device_get(self.monitor.best),
                   {**record.to_json(), workdir.WRITTEN_WITH: workdir.written_with(self.config)})
    self.saved_step = s
    self.writer.flush()

  def diagnose(self, s: int) -> dict[str, float]:
    """Diagnostics of iteration s. An interruption inside leaves the record as it was before
    (the checkpoint then says they are still due, and a resumed run runs them first)."""
    before = (dataclasses.replace(self.monitor.record), self.monitor.best)
    try:
      rec = self.monitor.run(s, self.variables, self.averaged_variables)
      self.writer.write(s, s / self.spe, rec)
      self.monitor.record.diagnosed_step = s
    except BaseException:
      self.monitor.record, self.monitor.best = before
      raise
    return rec

  def due_diagnostics(self) -> None:
    """A resumed run first runs the diagnostics its checkpoint's iteration missed."""
    s = self.start
    if s > 0 and self.due(s, self.config.eval_every) and self.monitor.record.diagnosed_step < s:
      logging.info("Running the diagnostics of iteration %d that the interrupted run missed", s)
      self.diagnose(s)

  def due(self, s: int, every: int) -> bool:
    """Whether iteration s logs / runs diagnostics / checkpoints: every `every` and the last."""
    return s % every == 0 or s == self.total

  def step(self, step: int) -> Any:
    """Runs iteration `step` and its logging, diagnostics and checkpoint. In a multi-process
    run the batch carries this process's stop flag (`self.stop`, set by `train`) and the step
    returns every process's maximum (preemption.py), which is returned here, not logged."""
    batch = self.batches.get(step // self.replay)
    flags = None if self.stop is None else self.stop.batch_flags(len(batch["label"]))
    if flags is not None:
      batch = dict(batch, stop=flags)
    with _first_step_failures(self.config, step == self.start, self.saved_step is not None):
      self.rstate, m = self.p_step(self.rstate, self.engine.place_batch(batch), self.step_rng)
      m = dict(self.engine.local_metrics(m))
    agreement = m.pop("stop", None)
    self.pending.append(m)
    self._time_step()
    s, c = step + 1, self.config
    if self.due(s, c.log_every):
      self.progress.train(self.flush_train_metrics(s))
    diagnose = self.due(s, c.eval_every)
    checkpoint = self.due(s, c.checkpoint_every)
    if diagnose or checkpoint:
      self._pause_step_clock()
      if diagnose:
        self.progress.diagnostics(s, self.diagnose(s))
      if checkpoint:
        self.save(s, self.train_clock.seconds())
      self.step_clock.start()
    self.progress.update()
    return agreement

  def _start_clocks(self) -> None:
    """Two clocks, both continuing the restored run's counts (RunRecord): `train_clock`, the
    training seconds (train_time_s, diagnostics and checkpoints included), and `step_clock`,
    the seconds in training steps alone (step_seconds over timed_steps: the per-step cost of a
    method in a real run). The step clock starts once this process's first step (its
    compilation) is done, and stops, after the queued steps finish, for diagnostics and
    checkpoints."""
    self.train_clock = timing.Stopwatch(self.monitor.record.train_time_s)
    self.step_clock = timing.Stopwatch(running=False)

  def _time_step(self) -> None:
    """After each step: the first one of this process starts the step clock, the others
    count."""
    if self.step_clock.running:
      self.monitor.record.timed_steps += 1
    else:
      self.step_clock.start(wait_for=self.rstate)

  def _pause_step_clock(self) -> None:
    """Before diagnostics or a checkpoint: the steps queued so far count, what follows not."""
    self.monitor.record.step_seconds += self.step_clock.stop(wait_for=self.rstate)

  def train(self) -> float:
    """The loop; Ctrl-C and SIGTERM save a checkpoint first (in a multi-process run, of an
    iteration all processes agree on: preemption.py). Returns the training time."""
    self._start_clocks()
    self.progress = _Progress(self.config, self.total, self.start, distributed.is_main())
    try:
      with preemption.StopOnSignal() as stop:
        self.stop = stop
        self.due_diagnostics()
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
    return self.train_clock.seconds()

  def _save_interrupted(self, why: KeyboardInterrupt) -> None:
    """On Ctrl-C / SIGTERM: checkpoints the iterations done since the last checkpoint. In a
    multi-process run only a stop every process agreed on saves (the others join the save); a
    process stopped alone (a second signal) keeps the last checkpoint."""
    if jax.process_count() > 1 and not isinstance(why, preemption.StopRequested):
      kept = "none saved yet" if self.saved_step is None else f"iteration {self.saved_step}"
      logging.warning("Stopped this process alone; the last checkpoint (%s) is kept", kept)
      return
    try:
      done = self.engine.step_of(self.rstate)  # the iterations the state has seen
    except RuntimeError:  # a second signal inside a step: its donated input state is gone
      logging.warning("Interrupted inside a step; the last checkpoint is kept")
      raise
    if done > self.start and done != self.saved_step:
      logging.warning("Interrupted: saving a checkpoint at iteration %d", done)
      self.save(done, self.train_clock.seconds())

  def finish(self, train_time: float) -> dict:
    """Final evaluation of the last and the kept (early-stopped or selected) weights, and of
    the averaged ones; writes results.json."""
    results = self._final_evaluation()
    results.update(self._run_summary(train_time))
    if distributed.is_main():
      workdir.write_json(os.path.join(self.workdir, "results.json"), results)
    _log_results(results, self.workdir)
    return results

  def _final_evaluation(self) -> dict:
    """The last weights' final evaluation, the overfitting flag and (same points, same noise):
    with validation selection the selected weights' ("selected"), else with
    config.eval_early_stopped_model the early-stopped weights' ("best"); with weight
    averaging the last averaged weights' ("averaged")."""
    c, record = self.config, self.monitor.record
    rng = jax.random.fold_in(self.eval_rng, -1 % (2**31))
    results = evaluation.final_evaluation(c, self.evaluator, self.variables, self.test_split, rng)
    results.update(self.monitor.overfitting_summary())

    def accuracies(variables: dict) -> dict:
      out = evaluation.final_evaluation(c, self.evaluator, variables, self.test_split, rng)
      return {k: out[k] for k in ("clean_acc", "pgd_acc", "autoattack_acc") if k in out}

    if self.monitor.validation_selection:
      results["selected"] = {"weights": record.selected, "iteration": int(record.best_step),
                             "val_pgd_acc": float(record.best_val_pgd),
                             "val_clean_acc": float(record.best_val_clean),
                             **accuracies(self.monitor.best)}
    elif c.eval_early_stopped_model:
      results["best"] = {"iteration": int(record.best_step),
                         "train_pgd_acc": float(record.best_train_pgd),
                         **accuracies(self.monitor.best)}
    averaged = self.averaged_variables
    if averaged is not None:
      results["averaged"] = {"iteration": self.total, **accuracies(averaged)}
    return results

  def _run_summary(self, train_time: float) -> dict:
    """What results.json says about the run besides its accuracies."""
    c, record = self.config, self.monitor.record
    return {
        "config": workdir.config_dict(c), "iterations": self.total, "epochs": c.num_epochs,
        "method": c.method, "method_args": dataclasses.asdict(methods.get(c.method).args_from(c)),
        "train_time_s": train_time, "wall_time_s": time.time() - self.wall_start,
        "devices": [str(d) for d in parallel.local_devices()],
        "final_train_metrics": self.flush_train_metrics(self.total),
        "step_time_s": record.step_seconds / max(record.timed_steps, 1),
        "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _log_results(results: dict, workdir_: str) -> None:
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
    run = _Run(config, workdir_, splits)
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
    _log_results(results, workdir_)
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
