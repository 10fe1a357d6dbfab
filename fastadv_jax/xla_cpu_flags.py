"""The XLA:CPU flags this library's entry points run with, and why.

`--xla_cpu_experimental_onednn_custom_call=true` hands convolutions to oneDNN (the library PyTorch
uses on CPU) instead of XLA's own kernels. Measured on this project's 2-core machine
(BENCHMARKS.md, "XLA flags"): the paper's 4-filter CNN trains 1.5x to 3.2x faster and the default
small CNN 1.07x to 1.30x faster, with the test suite passing unchanged. The flag only touches XLA:CPU, so it
is inert on GPU and TPU.

XLA reads XLA_FLAGS once, when the first JAX computation starts the backend, so `apply()` must run
before that: `main.py`, `evaluate.py` and `benchmark.py` call it first thing. Library users who
build their own scripts call it the same way. Set FASTADV_XLA_CPU_FLAGS=0 to run with XLA's
defaults, e.g. to compare; a flag the user already set in XLA_FLAGS is left as they set it.
"""
from __future__ import annotations

import os

DEFAULT_FLAGS = {"xla_cpu_experimental_onednn_custom_call": "true"}
OPT_OUT = "FASTADV_XLA_CPU_FLAGS"


def apply(environ: dict | None = None) -> str:
  """Adds DEFAULT_FLAGS to XLA_FLAGS (unless opted out or already set); returns the result."""
  env = os.environ if environ is None else environ
  current = env.get("XLA_FLAGS", "")
  if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
    return current
  extra = [f"--{name}={value}" for name, value in DEFAULT_FLAGS.items()
           if f"--{name}=" not in current]
  if extra:
    env["XLA_FLAGS"] = " ".join([current] + extra).strip()
  return env.get("XLA_FLAGS", "")
