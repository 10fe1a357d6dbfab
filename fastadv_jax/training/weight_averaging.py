"""Weight averaging (an exponential moving average of the weights), as the 2024-26 protocol uses.

After every optimiser step t (0-based) the average becomes
    ema <- tau_t * ema + (1 - tau_t) * theta,     ema = theta after the first step,
for the parameters and, with `ema_batch_stats`, the BatchNorm running statistics too (the
fast-AT benchmark averages every state_dict entry and does not recompute the statistics).
tau_t = `ema_decay` (the benchmark: 0.9995, no warm-up), or with `ema_warmup` DeepMind's rule
min(tau, (1 + t) / (10 + t)) (adversarial_robustness/jax), which lets the average follow the
fast-moving early weights. Kept in float32, beside the raw weights in the train state; `None`
when `ema_decay` is 0 (off).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections


def enabled(config: ml_collections.ConfigDict) -> bool:
  return float(config.ema_decay) > 0


def init(config: ml_collections.ConfigDict, variables: dict) -> dict | None:
  """The average before the first step: a float32 copy of the variables it averages (the first
  update replaces it by the weights after that step), or None when averaging is off."""
  if not enabled(config):
    return None
  avg = {"params": variables["params"]}
  if config.ema_batch_stats:
    avg["batch_stats"] = variables.get("batch_stats", {})
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), avg)


def decay(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """tau at 0-based step t (0 at t = 0, so the first update copies the weights)."""
  tau = jnp.asarray(float(config.ema_decay), jnp.float32)
  if config.ema_warmup:
    t = step.astype(jnp.float32)
    tau = jnp.minimum(tau, (1.0 + t) / (10.0 + t))
  return jnp.where(step == 0, 0.0, tau)


def update(config: ml_collections.ConfigDict, average: dict | None, params: Any,
           batch_stats: Any, step: jax.Array) -> dict | None:
  """The average after step `step` (0-based) produced `params` and `batch_stats`."""
  if average is None:
    return None
  tau = decay(config, step)
  new = {"params": params}
  if "batch_stats" in average:
    new["batch_stats"] = batch_stats
  return jax.tree.map(lambda a, v: tau * a + (1.0 - tau) * v.astype(jnp.float32), average, new)


def variables(average: dict, raw: dict) -> dict:
  """Model variables of the averaged weights: averaged parameters, and the averaged BatchNorm
  statistics or, when those are not averaged, the raw ones (DeepMind's choice)."""
  return {"params": average["params"],
          "batch_stats": average.get("batch_stats", raw.get("batch_stats", {}))}
