"""The unrolled Threefry path must draw exactly JAX's bits, so swapping it in changes no result."""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import randomness
from fastadv_jax.runtime import xla_cpu


def test_threefry2x32_matches_jax():
  rng = np.random.default_rng(0)
  for _ in range(3):
    k0, k1 = rng.integers(0, 2**32, 2, dtype=np.uint32)
    count = rng.integers(0, 2**32, 64, dtype=np.uint32)
    want = jax.extend.random.threefry_2x32((jnp.uint32(k0), jnp.uint32(k1)), jnp.asarray(count))
    y0, y1 = xla_cpu.threefry2x32(jnp.uint32(k0), jnp.uint32(k1), jnp.asarray(count[:32]),
                                     jnp.asarray(count[32:]))
    np.testing.assert_array_equal(np.concatenate([y0, y1]), np.asarray(want))


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (7,)])
def test_uniform_like_is_bit_identical_to_jax_random_uniform(shape):
  keys = randomness.example_keys(jax.random.key(3), jnp.arange(5))
  x = jnp.zeros((5,) + shape)
  got = jax.jit(lambda k: randomness.uniform_like(k, x, -0.25, 0.25))(keys)
  u = jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32))(keys)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(-0.25 + 0.5 * u))
  assert xla_cpu.reproduces_jax_uniform(keys, jnp.float32)


def test_uniform_like_falls_back_for_other_key_types():
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0, impl="rbg"), i))(jnp.arange(4))
  assert not xla_cpu.reproduces_jax_uniform(keys, jnp.float32)
  x = jnp.zeros((4, 6))
  got = randomness.uniform_like(keys, x, 2.0, 3.0)
  want = 2.0 + jax.vmap(lambda k: jax.random.uniform(k, (6,)))(keys)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  assert float(got.min()) >= 2.0 and float(got.max()) < 3.0
