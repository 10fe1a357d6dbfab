"""Metrics to `<workdir>/metrics.jsonl` (one JSON object per logged step) and TensorBoard."""
from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging
from tensorboardX import SummaryWriter


class MetricWriter:
  """Appends records; on resume, drops records past the restored step so no step appears twice."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    """`enabled=False` (processes other than 0 of a multi-process run) writes nothing."""
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      kept = [json.dumps(r) + "\n" for r in _parse(self.path) if r.get("step", 0) <= resume_step]
      with open(self.path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(self.path + ".tmp", self.path)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, epoch: float, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "epoch": round(float(epoch), 4)}
    for k, v in metrics.items():
      record[k] = float(v)
      if math.isfinite(float(v)):
        self.tb.add_scalar(k, float(v), int(step))
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def flush(self) -> None:
    if self.enabled:
      self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()


def _parse(path: str) -> list[dict]:
  """The records of a metrics.jsonl; a damaged line (cut short by a kill mid-write, bytes that
  are not UTF-8, or JSON that is not a record with a numeric "step") is skipped with a warning,
  so that a resume, which keeps the rows up to its checkpoint, never stops on one."""
  records = []
  with open(path, "rb") as f:
    for raw in f:
      if not raw.strip():
        continue
      try:
        record = json.loads(raw.decode("utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), (int, float)):
          raise ValueError("not a record with a numeric step")
        records.append(record)
      except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        logging.warning("%s: skipping a damaged line (a kill mid-write?): %r", path, raw[:80])
  return records


def read_metrics(workdir: str) -> list[dict]:
  """All records of metrics.jsonl (for plots and tests)."""
  return _parse(os.path.join(workdir, "metrics.jsonl"))
