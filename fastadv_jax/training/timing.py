"""The one timer of the package: a stopwatch that can wait for JAX's queued work.

JAX dispatches steps asynchronously, so a clock read right after a call measures the dispatch,
not the computation. `Stopwatch.start` / `stop` take the arrays to wait for (`wait_for`) and
block on them before reading the clock, so the time of the queued steps lands in the interval
where they ran. train.py times the run (train_time_s) and its steps alone (step_seconds) with it;
benchmark.py times its windows of steps.
"""
from __future__ import annotations

import time
from typing import Any

import jax


def _wait(wait_for: Any) -> None:
  if wait_for is not None:
    jax.block_until_ready(wait_for)


class Stopwatch:
  """Seconds accumulated over the intervals it ran (monotonic clock, `time.perf_counter`).

  `seconds` starts the count at a saved total (a resumed run continues its own count);
  `running=False` leaves it stopped until `start`.
  """

  def __init__(self, seconds: float = 0.0, *, running: bool = True):
    self.total = float(seconds)
    self._since: float | None = time.perf_counter() if running else None

  @property
  def running(self) -> bool:
    return self._since is not None

  def start(self, wait_for: Any = None) -> None:
    """(Re)starts the clock once the work queued for `wait_for` is done."""
    _wait(wait_for)
    self._since = time.perf_counter()

  def stop(self, wait_for: Any = None) -> float:
    """Stops the clock once the work queued for `wait_for` is done; returns the seconds of the
    interval this ends (0 when it was not running), also added to `total`."""
    _wait(wait_for)
    if self._since is None:
      return 0.0
    lap = time.perf_counter() - self._since
    self.total += lap
    self._since = None
    return lap

  def seconds(self) -> float:
    """The total so far, the running interval included (does not wait for queued work)."""
    if self._since is None:
      return self.total
    return self.total + (time.perf_counter() - self._since)


class RunClocks:
  """A training run's two clocks, continuing a restored run's counts (monitoring.RunRecord):
  `train`, the training seconds (train_time_s: diagnostics and checkpoints included), and
  `steps`, the seconds in training steps alone (step_seconds over timed_steps: the per-step cost
  of a method in a real run). The step clock starts once this process's first step (its
  compilation) is done, and stops, after the queued steps finish, for diagnostics and
  checkpoints. The counts live in the record passed to each call (the monitor may replace it)."""

  def __init__(self, train_time_s: float):
    self.train = Stopwatch(train_time_s)
    self.steps = Stopwatch(running=False)

  def stepped(self, state: Any, record: Any) -> None:
    """After each step: the first one of this process starts the step clock, the others
    count."""
    if self.steps.running:
      record.timed_steps += 1
    else:
      self.steps.start(wait_for=state)

  def pause(self, state: Any, record: Any) -> None:
    """Before diagnostics or a checkpoint: the steps queued so far count, what follows not."""
    record.step_seconds += self.steps.stop(wait_for=state)
