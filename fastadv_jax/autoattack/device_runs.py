"""What AutoAttack runs on the local devices: an attack's phases, the clean probe and the model
draws, each compiled once (pmap) and run over chunks of points.

The per-device functions are pure: every attack-specific decision is the `Component` record's
(component.py), so no attack is named here. Points are keyed by their position in the evaluated
set, so nothing depends on the chunking: which size a chunk has, or which points pad it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import parallel, randomness
from fastadv_jax.autoattack import checks, component
from fastadv_jax.autoattack import draws as draws_lib
from fastadv_jax.autoattack import losses as aa_losses
from fastadv_jax.runtime import distributed, xla_cpu

# (variables, x, key) -> logits; `key` drives a randomised model and is ignored by others.
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

# A later pass of an attack reuses a chunk size it compiled for if that computes at most this
# many times the points (padding included) a fresh size would (DeviceRuns.chunks).
REUSE_SLACK = 1.25


def phase_on_chunk(apply_fn: ApplyFn, components: Mapping[str, component.Component],
                   settings: component.Settings, variables, points, rng, eps, state, i0, rank,
                   restart, name: str, phase: str, block: int):
  """One phase of a component on one device's chunk: 'init' -> state, 'block' (iterations
  i0 .. i0 + block - 1, unrolled on CPU) -> state, 'finish' -> (robust, x_adv). The record
  decides everything attack-specific."""
  comp = components[name]
  x, y, idx = points
  logits_fn = lambda z, key: apply_fn(variables, z, key)  # noqa: E731
  example_rng, model_key = jax.random.split(rng)
  keys = randomness.example_keys(example_rng, idx)
  if phase == "init":
    target = (aa_losses.kth_class(logits_fn(x, model_key), rank) if comp.targeted else y)
    state = {"target": target}
  ctx = component.Context(logits_fn=logits_fn, x=x, y=y, target=state["target"], keys=keys,
                          eps=eps, model_key=model_key, rank=rank, settings=settings,
                          restart=restart)
  if phase == "init":
    return dict(state, attack=comp.init(ctx))
  if phase == "block":
    return dict(state, attack=jax.lax.fori_loop(  # static trip count: unrollable
        0, block, lambda j, s: comp.body(ctx, i0 + j, s), state["attack"],
        unroll=xla_cpu.attack_loop_unroll()))
  return comp.finish(ctx, state["attack"])


def probe_chunk(apply_fn: ApplyFn, variables, x, y):
  """Logits under two model keys, whether the CE input gradient is exactly zero, and each
  point's logits evaluated alone (vmap: a batch of one; the batch-dependence check)."""
  key_a, key_b = jax.random.key(1), jax.random.key(2)
  logits_a = apply_fn(variables, x, key_a)
  logits_b = apply_fn(variables, x, key_b)
  grad = jax.grad(lambda z: jnp.sum(aa_losses.cross_entropy(apply_fn(variables, z, key_a), y)))(x)
  zero = jnp.all(grad.reshape(grad.shape[0], -1) == 0, axis=1)
  alone = jax.vmap(lambda z: apply_fn(variables, z[None], key_a)[0])(x)
  return logits_a, logits_b, zero, alone


def count_chunk(apply_fn: ApplyFn, variables, x, y, idx, key, draws: int):
  """Per point, its correct draws out of `draws` (draws.correct_counts), keyed by position."""
  return draws_lib.correct_counts(apply_fn, variables, x, y, randomness.example_keys(key, idx),
                                  draws)


class DeviceRuns:
  """The per-device functions above, pmapped over `devices`, and the host loops that feed them
  chunks of `batch_size` points."""

  def __init__(self, apply_fn: ApplyFn, components: Mapping[str, component.Component],
               settings: component.Settings, devices: list, batch_size: int):
    self.apply_fn, self.components, self.settings = apply_fn, components, settings
    self.devices, self.n_dev = devices, len(devices)
    self.batch_size = parallel.device_batch_size(batch_size, self.n_dev)
    self.chunk_sizes: dict[str, set[int]] = {}  # per attack: the chunk sizes it compiled for
    pm = functools.partial(jax.pmap, devices=devices)
    # (variables, (x, y, idx), rng, eps, state, i0, rank, restart, name, phase, block): the
    # last 3 static, so the 9 target classes of a targeted attack and its restarts share one
    # compiled program per phase.
    # The points travel as one tuple with a tuple in_axes: with only ints and Nones, pmap takes
    # every argument for one leaf whenever the leaf count happens to equal the argument count
    # (e.g. empty variables and a one-array state) and maps the wrong arguments.
    self.phase = pm(functools.partial(phase_on_chunk, apply_fn, components, settings),
                    in_axes=(None, (0, 0, 0), None, None, 0, None, None, None),
                    static_broadcasted_argnums=(8, 9, 10))
    self.probe = pm(functools.partial(probe_chunk, apply_fn), in_axes=(None, 0, 0))
    self.count = pm(functools.partial(count_chunk, apply_fn), in_axes=(None, 0, 0, 0, None),
                    static_broadcasted_argnums=(5,))

  def map(self, fn: Callable, points: np.ndarray, arrays: tuple[np.ndarray, ...],
          attack: str | None = None) -> Iterator[tuple[np.ndarray, Any]]:
    """Yields (positions, outputs) of `fn(*sharded arrays[points])` chunk by chunk (for an
    `attack`, in chunks of a size its programs were compiled for where that pays: chunks)."""
    for m, sel in self.chunks(len(points), attack):
      pos = points[sel]
      out = fn(*parallel.shard(tuple(a[pos] for a in arrays), self.n_dev))
      yield pos[:m], parallel.unshard(out, m)

  def chunks(self, n: int, attack: str | None) -> list[tuple[int, np.ndarray]]:
    """parallel.chunks_for_devices(balanced=True), except that an attack's later passes (target
    classes, after points were broken) reuse a chunk size it already ran with when that costs
    at most REUSE_SLACK times the points computed with a fresh size: each new size compiles
    every phase of the attack again (seconds each on CPU, more than the padding costs). Results
    do not depend on the chunking (points are keyed by position)."""
    fresh = list(parallel.chunks_for_devices(n, self.batch_size, self.n_dev, balanced=True))
    if attack is None:
      return fresh
    sizes = self.chunk_sizes.setdefault(attack, set())
    slots = lambda size: -(-n // size) * size  # noqa: E731  points computed, padding included
    size = len(fresh[0][1])
    if sizes:
      best = min(sizes, key=lambda s: (slots(s), s))
      if slots(best) <= REUSE_SLACK * slots(size):
        size = best
    sizes.add(size)
    return [(min(start + size, n) - start, np.arange(start, start + size) % n)
            for start in range(0, n, size)]

  def attack_points(self, variables, rng, name: str, rank: int, restart: int, eps: float, x, y,
                    idx):
    """One attack (one target rank) on one chunk of points, its iterations driven from here:
    XLA:CPU runs convolutions inside a while loop several times slower than in straight-line
    code (xla_cpu.py), so each call runs a block of unrolled iterations."""
    eps = jnp.float32(eps)
    call = lambda state, i0, phase, block=0: self.phase(  # noqa: E731
        variables, (x, y, idx), rng, eps, state, jnp.int32(i0), jnp.int32(rank),
        jnp.int32(restart), name, phase, block)
    comp = self.components[name]
    state = call(None, 0, "init")
    total = comp.iterations(self.settings)
    for i0 in range(0, total, comp.block):
      state = call(state, i0, "block", min(comp.block, total - i0))
      if comp.settled is not None and np.all(np.asarray(comp.settled(state["attack"]))):
        break  # e.g. every point of the chunk is broken
    return call(state, 0, "finish")

  def probe_points(self, variables: Any, x: np.ndarray, y: np.ndarray, lo: int, hi: int
                   ) -> tuple[np.ndarray, ...]:
    """The clean probe of this process's points, gathered over the processes: (clean, finite,
    zero gradient, looks like probabilities, draw difference, batch gap) per point."""
    n = len(y)
    clean, finite, zero, looks_like = (np.zeros(n, bool) for _ in range(4))
    difference, gap = np.zeros(n, np.float32), np.zeros(n, np.float32)
    probe = lambda xs, ys: self.probe(variables, xs, ys)  # noqa: E731
    for pos, (la, lb, zero_grad, alone) in self.map(probe, np.arange(lo, hi), (x, y)):
      clean[pos] = np.argmax(la, -1) == y[pos]
      finite[pos] = np.all(np.isfinite(la), -1) & np.all(np.isfinite(lb), -1)
      difference[pos], looks_like[pos] = checks.point_flags(la, lb)
      zero[pos] = zero_grad
      gap[pos] = checks.batch_gap(la, alone)
    few = slice(lo, min(hi, lo + checks.EAGER_POINTS))
    finite[few] &= checks.eagerly_finite(self.apply_fn, variables, x[few])
    return distributed.gather_points(
        tuple(v[lo:hi] for v in (clean, finite, zero, looks_like, difference, gap)), n)

  def draw_counts(self, variables, key, pos: np.ndarray, xs: np.ndarray, y: np.ndarray,
                  draws: int) -> np.ndarray:
    """Per point of `pos`, in how many of `draws` model draws from `key` the model classifies
    `xs` (aligned with pos) as y[pos]."""
    counts = np.zeros(len(pos), np.int32)
    for m, sel in parallel.chunks_for_devices(len(pos), self.batch_size, self.n_dev,
                                              balanced=True):
      args = parallel.shard((xs[sel], y[pos[sel]], pos[sel].astype(np.int32)), self.n_dev)
      counts[sel[:m]] = parallel.unshard(self.count(variables, *args, key, draws), m)
    return counts

  def checked_points(self, n: int) -> int:
    """How many leading points the reference's sanity checks look at: the first chunk of a
    single process with all the run's devices (this process's first chunk in a single-process
    run), so a multi-process run gives the verdict of a one-process run with as many devices
    (processes with equal device counts assumed, as pmap does)."""
    n_dev = self.n_dev * jax.process_count()
    batch = parallel.device_batch_size(self.batch_size, n_dev)
    return next(parallel.chunks_for_devices(n, batch, n_dev, balanced=True))[0]
