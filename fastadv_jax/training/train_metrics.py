"""The training metrics between two rows of metrics.jsonl.

Each step's metrics stay on the device until the next row is due (every log_every iterations
and the last): then they come to the host, are checked for NaN/Inf (NonFiniteError stops the
run; the last checkpoint, all finite, is kept), averaged and written. A checkpoint taken between
two rows (an interruption) saves them instead, and a resumed run starts with them.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from fastadv_jax.training import metric_writers


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN/Inf; the last checkpoint (all finite) is kept."""


class TrainMetrics:
  """The per-step metrics not yet in a row; `saved` are the ones a checkpoint carried
  ({name: [value, dtype]} per step), `start` the first iteration this process runs."""

  def __init__(self, writer: metric_writers.MetricWriter, steps_per_epoch: int,
               saved: list[dict], start: int):
    self.writer, self.spe = writer, steps_per_epoch
    self.rows: list[dict] = [{k: np.asarray([v], dtype=dtype) for k, (v, dtype) in m.items()}
                             for m in saved]
    self.first = start - len(self.rows)  # the iteration before the first pending one

  def append(self, metrics: dict) -> None:
    self.rows.append(metrics)

  def checked(self, saved_step: int | None) -> list[dict]:
    """The pending metrics on the host; NonFiniteError naming the iteration on NaN/Inf."""
    ms = jax.device_get(self.rows)
    for i, m in enumerate(ms):
      if not bool(np.all(m["finite"])):
        raise NonFiniteError(
            f"non-finite loss or gradient at iteration {self.first + i + 1}; the last "
            f"checkpoint ({saved_step}) is kept. Lower lr_max, check the data, or "
            "disable half_precision, in a new --workdir (a run keeps its config).")
    return ms

  def flush(self, s: int, record: Any, saved_step: int | None) -> dict[str, float]:
    """Averages the metrics since the last row into the row of iteration s, checked, and
    writes it; the record keeps it (for results.json). Nothing pending: the last row's."""
    if not self.rows:
      return record.last_train_metrics
    ms = self.checked(saved_step)
    avg = {k: float(np.mean([np.asarray(m[k])[0] for m in ms])) for k in ms[0] if k != "finite"}
    self.writer.write(s, s / self.spe, avg)
    self.rows, self.first = [], s
    record.last_train_metrics = avg
    return avg

  def for_checkpoint(self, saved_step: int | None) -> list[dict]:
    """The pending metrics, checked, as a checkpoint saves them."""
    return [{k: [np.asarray(v)[0].item(), str(np.asarray(v).dtype)] for k, v in m.items()}
            for m in self.checked(saved_step)]
