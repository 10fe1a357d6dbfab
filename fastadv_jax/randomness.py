"""Per-example randomness that does not depend on how a batch is split over devices.

Each example draws from `fold_in(rng, global_index)`, so the noise an example sees is the same on
1 device or N: this is what lets the N-device step equal the 1-device step exactly.

`uniform_like` draws the same bits as `jax.random.uniform` (tested bit for bit), but through an
unrolled Threefry-2x32. JAX lowers its Threefry primitive on CPU to a rolled 5-iteration loop,
which XLA:CPU runs about 15x slower than the straight-line version (5.13 vs 0.34 ms for the noise
of a 128 x 32x32x3 batch on this project's 2-core machine; experiments/noise_bench.py). On GPU/TPU JAX's own
lowering is already unrolled, so the two paths compile to the same work there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Threefry-2x32 with 20 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
# SC 2011): rotation constants for the two alternating groups of four rounds, key-schedule parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(v: jax.Array, r: int) -> jax.Array:
  return (v << np.uint32(r)) | (v >> np.uint32(32 - r))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 (20 rounds) of the counter pair (x0, x1) under key (k0, k1), straight-line.

  All arguments are uint32 and broadcast together; equals `jax.random.threefry_2x32`.
  """
  ks = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotl(x1, r) ^ x0
    x0 = x0 + ks[(block + 1) % 3]
    x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _fast_path(keys: jax.Array, dtype) -> bool:
  """The unrolled path reproduces JAX's bits for typed threefry keys in partitionable mode."""
  return (jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
          and str(jax.random.key_impl(keys)) == "threefry2x32"
          and jax.config.jax_threefry_partitionable and dtype == jnp.float32)


def _uniform01(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Per-key U[0, 1) float32 of `shape`, bit-identical to vmap(jax.random.uniform)(keys)."""
  size = int(np.prod(shape))
  if size >= 2**32:
    raise ValueError(f"uniform_like: {size} values per example exceed the 32-bit counter")
  kd = jax.random.key_data(keys).reshape(-1, 2)
  counter = jax.lax.iota(jnp.uint32, size)[None, :]
  b0, b1 = threefry2x32(kd[:, :1], kd[:, 1:], jnp.zeros_like(counter), counter)
  # As jax.random.uniform: 23 random mantissa bits under exponent 0 give [1, 2); subtract 1.
  mantissa = ((b0 ^ b1) >> np.uint32(9)) | np.uint32(0x3F800000)
  u = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - jnp.float32(1.0)
  return u.reshape(keys.shape + tuple(shape))


def example_keys(rng: jax.Array, global_index: jax.Array) -> jax.Array:
  """One key per example: fold the example's index in the global batch into `rng`."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(global_index)


def uniform_like(keys: jax.Array, x: jax.Array, low, high) -> jax.Array:
  """Per-example U(low, high) of the shape of each x[i] (low/high scalars or per-example)."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  if _fast_path(keys, dtype):
    u = _uniform01(keys, x.shape[1:])
  else:
    u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], dtype))(keys)
  low = jnp.asarray(low, dtype)
  high = jnp.asarray(high, dtype)
  return low + (high - low) * u


def split_keys(keys: jax.Array, n: int) -> list[jax.Array]:
  """Splits every per-example key into n independent per-example keys."""
  split = jax.vmap(lambda k: jax.random.split(k, n))(keys)
  return [split[:, i] for i in range(n)]
