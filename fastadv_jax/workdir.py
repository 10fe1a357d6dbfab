"""The files of a workdir besides checkpoints and metrics: config.json and results.json."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import logging


def write_json(path: str, obj: Any) -> None:
  """Atomic: a reader (or a killed writer) never leaves a half-written file behind."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json; warns when a resumed run's config differs from the stored one."""
  path = os.path.join(workdir, "config.json")
  now = config_dict(config)
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
      logging.warning("Config differs from the one stored in %s in: %s", path, changed)
  write_json(path, now)


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The run's config; fields added to the library since the run started take their defaults."""
  from fastadv_jax.configs import default  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  config = default.get_config()
  config.update(stored)
  return config
