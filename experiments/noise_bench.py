"""Why `randomness.uniform_like` has its own Threefry: per-example noise, JAX's path vs ours.

  .venv/bin/python experiments/noise_bench.py [--batch=128] [--shape=32,32,3]

Both draw the same bits (tests/test_randomness.py); this prints the time of each, jitted, as the
median of 7 windows of 20 calls. On CPU, JAX lowers Threefry to a rolled loop.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from fastadv_jax import randomness


def _time(fn, *args, windows: int = 7, calls: int = 20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(windows):
    t = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / calls)
  return statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--shape", default="32,32,3")
  args = p.parse_args()
  shape = (args.batch,) + tuple(int(s) for s in args.shape.split(","))
  x = jnp.zeros(shape)
  keys = randomness.example_keys(jax.random.key(0), jnp.arange(args.batch))
  jax_path = jax.jit(lambda k: -1.0 + 2.0 * jax.vmap(
      lambda kk: jax.random.uniform(kk, shape[1:]))(k))
  ours = jax.jit(lambda k: randomness.uniform_like(k, x, -1.0, 1.0))
  assert bool(jnp.all(jax_path(keys) == ours(keys)))
  t_jax, t_ours = _time(jax_path, keys), _time(ours, keys)
  print(f"backend {jax.default_backend()}, jax {jax.__version__}, noise of shape {shape}")
  print(f"vmap(jax.random.uniform):  {t_jax * 1e3:7.3f} ms")
  print(f"randomness.uniform_like:   {t_ours * 1e3:7.3f} ms  ({t_jax / t_ours:.1f}x faster)")


if __name__ == "__main__":
  main()
