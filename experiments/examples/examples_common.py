"""Shared by the own-loop examples: data (real Fashion-MNIST or random), batching, and the
evaluation a researcher reports (clean, PGD-k-r, AutoAttack) for any `logits_fn(x) -> logits`.

Kept framework-free (no NNX or linen here) so that each example shows only its own model code.
"""
from __future__ import annotations

import argparse

import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastadv_jax import attacks, autoattack, randomness
from fastadv_jax.data import datasets

LogitsFn = Callable[[jax.Array], jax.Array]


def load_data(synthetic: bool, n_test: int, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train x, train y, test x, test y), float32 NHWC in [0, 1]. `synthetic`: random images
  and labels (for CI, where the dataset may not be prepared)."""
  if synthetic:
    rng = np.random.default_rng(seed)
    xs = rng.uniform(0, 1, (512 + n_test, 28, 28, 1)).astype(np.float32)
    ys = rng.integers(0, 10, 512 + n_test).astype(np.int32)
    return xs[:512], ys[:512], xs[512:], ys[512:]
  train = datasets.load_split("fashion_mnist", "train")
  test = datasets.load_split("fashion_mnist", "test")
  to_float = lambda a: a.astype(np.float32) / 255.0  # noqa: E731
  return (to_float(train.images), train.labels, to_float(test.images[:n_test]),
          test.labels[:n_test])


def batches(x: np.ndarray, y: np.ndarray, batch: int, steps: int, seed: int = 0
            ) -> Iterator[tuple[jax.Array, jax.Array]]:
  """`steps` shuffled minibatches, reshuffling at each pass over the data."""
  rng = np.random.default_rng(seed)
  perm, pos = rng.permutation(len(x)), 0
  for _ in range(steps):
    if pos + batch > len(x):
      perm, pos = rng.permutation(len(x)), 0
    idx = perm[pos:pos + batch]
    pos += batch
    yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


def clean_accuracy(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray) -> float:
  return float(np.mean(np.asarray(jnp.argmax(jax.jit(logits_fn)(jnp.asarray(x)), -1)) == y))


def pgd_accuracy(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, eps: float, steps: int,
                 restarts: int, seed: int = 0) -> float:
  """PGD-`steps`-`restarts` (step eps / 4, uniform starts, worst case over restarts): the
  library's evaluation attack, on a closure over the trained weights.

  `unroll=1` keeps the step loop rolled: for this CNN it was 3.7x faster than the CPU default
  (steps unrolled) on 100 points. (The outputs in README.md were recorded when the default also
  unrolled the restarts into one program, which ran out of memory for PGD-50-10 on 200 points;
  the library now loops the restarts.)
  """
  yj = jnp.asarray(y)

  def loss_and_logits(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = logits_fn(z)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yj), logits

  @jax.jit
  def run(xj: jax.Array) -> jax.Array:
    keys = randomness.batch_keys(jax.random.key(seed), xj.shape[0])
    robust, _ = attacks.pgd_with_restarts(loss_and_logits, xj, yj, keys, eps, eps / 4, steps,
                                          restarts, unroll=1)
    return robust

  return float(np.mean(np.asarray(run(jnp.asarray(x)))))


def autoattack_accuracy(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, eps: float,
                        apgd_steps: int, square_queries: int) -> autoattack.AutoAttackResult:
  """Standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) of a deterministic model."""
  return autoattack.evaluate(logits_fn, x, y, eps, "standard", apgd_steps=apgd_steps,
                             fab_steps=apgd_steps, square_queries=square_queries,
                             progress=False)


def report(logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, eps: float, pgd_steps: int,
           pgd_restarts: int, aa_points: int, apgd_steps: int, square_queries: int
           ) -> dict[str, float]:
  """Prints and returns clean and PGD-k-r accuracy on (x, y), and AutoAttack's on its first
  `aa_points` (AutoAttack is the slow one on a CPU), with the clean and PGD accuracy on the
  same points for comparison."""
  t0 = time.time()
  out = {"clean_acc": clean_accuracy(logits_fn, x, y)}
  out["pgd_acc"] = pgd_accuracy(logits_fn, x, y, eps, pgd_steps, pgd_restarts)
  n = min(aa_points, len(x))
  aa = autoattack_accuracy(logits_fn, x[:n], y[:n], eps, apgd_steps, square_queries)
  out["autoattack_acc"] = aa.accuracy
  out["aa_subset_pgd_acc"] = pgd_accuracy(logits_fn, x[:n], y[:n], eps, pgd_steps, pgd_restarts)
  print(f"eval on {len(x)} test points, eps={eps:.4f}:")
  print(f"  clean_acc={out['clean_acc']:.4f}")
  print(f"  pgd{pgd_steps}_{pgd_restarts}_acc={out['pgd_acc']:.4f}")
  print(f"AutoAttack (standard; apgd/fab steps {apgd_steps}, square queries {square_queries}) "
        f"on the first {n} of them:")
  print(f"  subset_clean_acc={aa.clean_accuracy:.4f}  "
        f"subset_pgd{pgd_steps}_{pgd_restarts}_acc={out['aa_subset_pgd_acc']:.4f}")
  counts = ", ".join(f"{r.name}={r.robust_after}" for r in aa.records)
  print(f"  autoattack_acc={out['autoattack_acc']:.4f}  (robust after each attack: {counts})")
  for w in aa.warnings:
    print(f"  autoattack warning: {w}")
  print(f"  eval_time_s={time.time() - t0:.1f}")
  return out


def own_loop_parser(description: str) -> argparse.ArgumentParser:
  """The flags both own-loop examples take (NNX and linen): method, schedule, evaluation."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--method", choices=("gradalign", "nfgsm"), default="gradalign")
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--eps", type=float, default=0.1, help="L-inf radius, pixel units")
  p.add_argument("--lam", type=float, default=1.0, help="GradAlign's lambda")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--eval_points", type=int, default=200, help="test points for clean / PGD")
  p.add_argument("--aa_points", type=int, default=50, help="the first ones also for AutoAttack")
  p.add_argument("--pgd_steps", type=int, default=50)
  p.add_argument("--pgd_restarts", type=int, default=10)
  p.add_argument("--apgd_steps", type=int, default=100, help="APGD and FAB iterations")
  p.add_argument("--square_queries", type=int, default=5000, help="AutoAttack's: 5000")
  p.add_argument("--synthetic", action="store_true", help="random data instead of Fashion-MNIST")
  p.add_argument("--seed", type=int, default=0)
  return p
