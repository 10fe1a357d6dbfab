"""Everything in this library that exists only because of XLA:CPU, with its measured effect.

On GPUs and TPUs none of this changes what runs (the flags are CPU-only, loops stay rolled, the
barrier is left out, and JAX's own Threefry lowering is already straight-line there).
Measurements: BENCHMARKS.md, on this project's 2-core machine.

1. `apply(flags=models.xla_flags(model))`: which library runs the convolutions, chosen per
   model. XLA:CPU hands each convolution to YNNPACK by default;
   `--xla_cpu_experimental_onednn_custom_call=true` gives oneDNN the ones YNNPACK declines. That
   is the best set for the two CNNs (the paper's 4-filter CNN trains 1.5x to 3.2x faster than
   with XLA's own kernels). On the ResNets, YNNPACK's weight-gradient convolutions run at half
   the speed of XLA's Eigen ones (89 vs 40 ms for a 64-channel 3x3 layer at batch 128) and
   oneDNN's are slower still, so there YNNPACK's convolutions are switched off and Eigen runs
   them: a PreAct ResNet-18 step is 1.03x to 1.27x faster, a WRN-28-10 step 1.20x to 1.26x
   (`models.xla_flags`: each model's record, models.ModelSpec.xla_flags, names its family). XLA
   reads XLA_FLAGS once, when the first JAX computation starts the backend, so `apply()` must
   run before that: `main`, `evaluate` and `benchmark` call it first thing with the run's model;
   your own scripts should too. FASTADV_XLA_CPU_FLAGS=0 opts out; a flag already set in
   XLA_FLAGS is left as the user set it.
2. `attack_loop_unroll()`: attack loops (PGD) are fully unrolled on CPU. XLA:CPU runs
   convolutions inside a while-loop body several times slower than in straight-line code
   (jax-ml/jax#12868): PGD-50 on the small CNN took 229 ms/step rolled vs 48 ms/step unrolled,
   for 1.4 s more compile time.
3. `materialize()`: on CPU, the input of each ResNet convolution is written out once before
   the convolution (an optimization barrier). XLA:CPU transposes that input into another layout
   for the weight-gradient convolution, and without the barrier it fuses the preceding
   BatchNorm and ReLU into the transposing loop, which then runs about 5x slower than a plain
   transpose: 384 of a 1370 ms ResNet-18 step (batch 128) went to these loops, 140 ms after.
   Values are unchanged; the CNNs do not use it (no gain there, measured).
4. `uniform01()`: per-example uniform noise through a straight-line Threefry-2x32 with exactly
   the bits of `jax.random.uniform` (tested). JAX lowers its Threefry primitive on CPU to a
   rolled 5-iteration loop, ~15x slower (5.13 vs 0.34 ms for a 128 x 32x32x3 batch;
   experiments/noise_bench.py). `randomness.uniform_like` uses it when the bits agree.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import xla_bridge

# The two XLA_FLAGS families, measured per convolution pass and per training step in
# BENCHMARKS.md ("Convolution backends on XLA:CPU"). Which one a model runs with is part of its
# record (models.ModelSpec.xla_flags); models not registered get CNN_FLAGS.
CNN_FLAGS = {"xla_cpu_experimental_onednn_custom_call": "true"}
RESNET_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
OPT_OUT = "FASTADV_XLA_CPU_FLAGS"


def apply(environ: dict | None = None, flags: Mapping[str, str] | None = None) -> str:
  """Adds `flags` (default CNN_FLAGS; a model's own are `models.xla_flags(name)`) to XLA_FLAGS,
  unless opted out or already set there; returns the result.

  Warns when JAX's backend has already started in this process: XLA has read its flags then,
  and the new ones would only reach processes started later."""
  env = os.environ if environ is None else environ
  current = env.get("XLA_FLAGS", "")
  if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return current
  flags = CNN_FLAGS if flags is None else flags
  extra = [f"--{name}={value}" for name, value in flags.items()
           if f"--{name}=" not in current]
  if extra:
    env["XLA_FLAGS"] = " ".join([current] + extra).strip()
    if environ is None and _backend_started():
      logging.warning("xla_cpu.apply() after JAX's backend started: %s will not take effect "
                      "in this process", " ".join(extra))
  return env.get("XLA_FLAGS", "")


def _backend_started() -> bool:
  try:
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without it: no warning rather than an error
    return False


def materialize(x: jax.Array) -> jax.Array:
  """`x` written out as it is, on CPU (an optimization barrier); unchanged on GPUs and TPUs.

  Decided per platform at lowering time (see the module docstring, item 3)."""
  return jax.lax.platform_dependent(x, cpu=jax.lax.optimization_barrier, default=lambda v: v)


def conv_materialized_input(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
  """`jax.lax.conv_general_dilated` with its input materialized on CPU (for `nn.Conv`)."""
  return jax.lax.conv_general_dilated(materialize(lhs), rhs, *args, **kwargs)


def attack_loop_unroll(platform: str | None = None) -> bool | int:
  """Unrolling for attack loops on `platform` (default: JAX's backend): full on CPU, none
  elsewhere (see the module docstring). attacks.pgd picks it per platform at lowering time."""
  platform = jax.default_backend() if platform is None else platform
  return True if platform == "cpu" else 1


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


def reproduces_jax_uniform(keys: jax.Array, dtype) -> bool:
  """`uniform01` gives JAX's bits for typed threefry keys in partitionable mode, float32."""
  return (jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
          and str(jax.random.key_impl(keys)) == "threefry2x32"
          and jax.config.jax_threefry_partitionable and dtype == jnp.float32)


def uniform01(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
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
