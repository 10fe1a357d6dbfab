"""Why attack loops are unrolled on CPU: PGD step time, rolled vs fully unrolled fori_loop.

  .venv/bin/python experiments/loop_unroll_bench.py [--points=500] [--steps=50]

Times a jitted `attacks.pgd` on the small CNN (width 16, BatchNorm, eval mode) both ways and
prints compile time and time per PGD step.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import attacks, losses, models


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--points", type=int, default=500)
  p.add_argument("--steps", type=int, default=50)
  args = p.parse_args()
  model = models.SmallCNN(width=16)
  v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  x = jnp.asarray(np.random.default_rng(0).random((args.points, 28, 28, 1)), jnp.float32)
  y = jnp.zeros(args.points, jnp.int32)
  print(f"backend {jax.default_backend()}, jax {jax.__version__}, {args.points} points, "
        f"{args.steps} PGD steps")
  for unroll in (1, True):
    def run(v, x, y, unroll=unroll):
      loss_fn = lambda z: losses.cross_entropy(model.apply(v, z, train=False), y)  # noqa: E731
      return attacks.pgd(loss_fn, x, 0.1, 0.025, args.steps, jnp.zeros_like(x), unroll=unroll)
    fn = jax.jit(run)
    t = time.perf_counter()
    compiled = fn.lower(v, x, y).compile()
    compile_s = time.perf_counter() - t
    compiled(v, x, y).block_until_ready()
    t = time.perf_counter()
    compiled(v, x, y).block_until_ready()
    per_step = (time.perf_counter() - t) / args.steps
    print(f"unroll={str(unroll):5s} compile {compile_s:5.2f} s   {1e3 * per_step:7.1f} ms/step")


if __name__ == "__main__":
  main()
