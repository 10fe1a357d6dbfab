"""Ctrl-C (SIGINT) and pre-emption (SIGTERM): the training loop stops between two whole
iterations and saves a checkpoint; the command line then exits 130 / 143 (cli.py).

One process. The signal handler only sets a flag; `StopOnSignal.check()`, called after each
iteration, raises `StopRequested` (a KeyboardInterrupt named after the signal) when it is set.
A signal therefore never lands inside a step whose input state was donated. A second signal
raises KeyboardInterrupt at once.

Several processes (distributed.py). A signal usually reaches one process only (a pre-empted
host, a Ctrl-C in one terminal). If that process stopped alone, the others would wait forever
in the next collective of the step. So every process has a flag (0 none, 1 SIGINT, 2 SIGTERM)
that rides with each training batch (`batch_flags`: one value per row, each process filling its
own rows), and the step takes its maximum over the device axis, which spans every process's
devices (train_step.py, `metrics["stop"]`): the same value on every process, computed inside
the step's own program: no extra program to dispatch each iteration, and no second program
whose cross-process collective would have to be ordered against the step's (two programs on a
device are ordered only by their data). The agreed value is read one iteration later (after iteration s, step s - 1's):
by then every process has dispatched step s - 1, so the read never waits for a process that is
not coming, and step s is already queued, so the devices never idle. Every process reads the
agreed value after the same iteration, so all stop after the same iteration s, all save
checkpoint s (Checkpointer.save), and all exit 143 if any process got SIGTERM, else 130. After
the loop the last agreement is read, so a signal during the last iterations is not lost.
Single-process runs add no flag to the batch (the step's program is unchanged) and stop as
before.

In a multi-process run a second signal still stops that process at once, without a checkpoint
(the others could not join the save); so does a signal that arrives after that last agreement or
a SIGTERM during the final evaluation (`SigtermAsInterrupt`). That process exits at once with
130 / 143 (`exit_if_alone`: a normal exit would wait in JAX's shutdown barrier for the others),
and the others, waiting in their next collective, abort when JAX's distributed runtime notices
that it is gone (its heartbeat timeout). The last checkpoint is kept, and rerunning the command on
every process resumes from it (and reruns the final evaluation).

Why not JAX's own preemption service (`multihost_utils.reached_preemption_sync_point`)? It
handles SIGTERM alone (not Ctrl-C, so no shared exit code), through a C++ handler that
`jax.distributed.initialize` installs and that any Python `signal.signal(SIGTERM, ...)` replaces;
and it agrees through the coordination service's key-value store, outside the devices' order of
work. The agreement above needs nothing but the step's own axis. (That C++
handler is still in place before the training loop, where a SIGTERM to a process of a
multi-process run is logged by JAX and otherwise ignored, as before; after the loop, Python
cannot put it back and the default action takes its place.)
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import jax
import numpy as np
from absl import logging


# The flags, ordered so that the maximum over processes is the signal to report: SIGTERM wins.
_FLAGS = {signal.SIGINT: 1, signal.SIGTERM: 2}
_NAMES = {1: "SIGINT", 2: "SIGTERM"}


class StopRequested(KeyboardInterrupt):
  """A stop between two whole iterations (the state is intact: save it); str() is the signal's
  name, SIGINT or SIGTERM, as cli.run reads it."""


class StopOnSignal:
  """Inside the training loop, SIGINT and SIGTERM only ask the loop to stop after an iteration
  (`check`), in a multi-process run one that every process agrees on (module docstring); a
  second signal stops this process at once."""

  def __init__(self):
    self.flag = 0
    self.previous: dict = {}
    self.agree = jax.process_count() > 1
    self._pending = None  # the agreement of the previous iteration's step

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.flag:  # a second signal: do not wait
      raise KeyboardInterrupt(name)
    self.flag = _FLAGS[signal.Signals(signum)]
    if self.agree:
      logging.warning("%s received: every process of the run stops after an iteration they "
                      "agree on (again to stop this process at once, without a checkpoint)", name)
    else:
      logging.warning("%s received: stopping after this iteration (again to stop at once)",
                      name)

  def batch_flags(self, n_rows: int) -> np.ndarray | None:
    """Several processes: this process's flag for every row of the global batch (the step
    takes the maximum over all devices, so over every process's rows); None with one."""
    return np.full((n_rows,), self.flag, np.int32) if self.agree else None

  def check(self, iteration: int, agreement: Any = None) -> None:
    """After `iteration`: raises StopRequested if the run is to stop here. One process: if it
    got a signal. Several: keeps this iteration's agreement (the step's `stop` output) and
    reads the previous one."""
    if not self.agree:
      if self.flag:
        raise StopRequested(_NAMES[self.flag])
      return
    previous, self._pending = self._pending, agreement
    if previous is not None:
      self._stop_if_agreed(previous, iteration)

  def finish(self, iteration: int) -> None:
    """After the last iteration (several processes): reads the last agreement, so that a
    signal during the last iterations stops every process too (after `iteration`)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._stop_if_agreed(pending, iteration)

  def _stop_if_agreed(self, agreement: Any, iteration: int) -> None:
    agreed = int(np.max(jax.device_get(agreement)))
    if agreed:
      name = _NAMES[agreed]
      logging.warning("Stopping after iteration %d: a process of the run got %s", iteration,
                      name)
      self.flag = agreed  # a further signal stops this process at once
      raise StopRequested(name)

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self.previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, exc_type: Any, *exc: Any) -> None:
    _restore(self.previous)
    if self.agree and exc_type is None and self.flag:
      # A signal after the last agreement: this process alone stops, as in the final evaluation.
      raise KeyboardInterrupt(_NAMES[self.flag])


class SigtermAsInterrupt:
  """Outside the training loop (the final evaluation) SIGTERM acts like Ctrl-C at once: this
  process alone stops (in a multi-process run the others end when the runtime notices); the
  final evaluation reruns on resume."""

  def __enter__(self) -> "SigtermAsInterrupt":
    self.previous = {}
    if threading.current_thread() is threading.main_thread():
      self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    return self

  def __exit__(self, *exc: Any) -> None:
    _restore(self.previous)


def raise_keyboard_interrupt(signum: int, frame: Any) -> None:
  """SIGTERM outside the training loop: like Ctrl-C (the final evaluation reruns on resume)."""
  del frame
  raise KeyboardInterrupt(signal.Signals(signum).name)


def _restore(previous: dict) -> None:
  """Puts back the handlers replaced. One that Python did not install cannot be put back: it is
  reported as None, or as SIG_DFL when installed after Python started (JAX's C++ SIGTERM
  handler of a multi-process run), and the default action takes its place."""
  for sig, handler in previous.items():
    signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def exit_if_alone(interrupt: KeyboardInterrupt, code: int) -> None:
  """Ends a process of a multi-process run that stops alone (any interrupt but a
  StopRequested) at once, with `code`. A normal exit would wait in JAX's shutdown barrier for
  the other processes, which never arrive (they end when the runtime notices this one is gone),
  and then abort with another exit code. Everything the run writes is closed by then."""
  if (isinstance(interrupt, StopRequested) or not jax.distributed.is_initialized()
      or jax.process_count() == 1):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
