"""Per-example randomness that does not depend on how a batch is split over devices.

Each example draws from `fold_in(rng, global_index)`, so the noise an example sees is the same on
1 device or N: this is what lets the N-device step equal the 1-device step exactly. On CPU the
uniform noise comes from a straight-line Threefry with JAX's exact bits (xla_cpu.uniform01).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fastadv_jax import parallel
from fastadv_jax.runtime import xla_cpu


def example_keys(rng: jax.Array, global_index: jax.Array) -> jax.Array:
  """One key per example: fold the example's index in the global batch into `rng`."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(global_index)


def batch_keys(key: jax.Array, batch_size: int, axis_name: str | None = None) -> jax.Array:
  """Per-example keys for a batch of the caller's: one key (typed, or raw uint32 key data)
  -> `fold_in(key, global index)` for each example; (B,) keys are returned as they are. Under
  pmap / shard_map (`axis_name` bound) the index is the example's place in the global batch,
  so an example draws the same noise whatever the device split."""
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.ndim == 1:
    return key
  return example_keys(key, parallel.global_index(batch_size, axis_name))


def uniform_like(keys: jax.Array, x: jax.Array, low, high) -> jax.Array:
  """Per-example U(low, high) of the shape of each x[i] (low/high scalars or per-example)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  if xla_cpu.reproduces_jax_uniform(keys, dtype):
    u = xla_cpu.uniform01(keys, x.shape[1:])
  else:
    u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], dtype))(keys)
  low = jnp.asarray(low, dtype)
  high = jnp.asarray(high, dtype)
  return low + (high - low) * u


def normal_like(keys: jax.Array, x: jax.Array) -> jax.Array:
  """Per-example N(0, 1) of the shape of each x[i], as jax.random.normal draws it (erf_inv of a
  uniform on (-1, 1)), on uniform_like's fast path."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  lo = jnp.nextafter(jnp.asarray(-1.0, dtype), jnp.asarray(1.0, dtype))
  return jnp.sqrt(jnp.asarray(2.0, dtype)) * jax.lax.erf_inv(uniform_like(keys, x, lo, 1.0))


def split_keys(keys: jax.Array, n: int) -> list[jax.Array]:
  """Splits every per-example key into n independent per-example keys."""
  split = jax.vmap(lambda k: jax.random.split(k, n))(keys)
  return [split[:, i] for i in range(n)]
