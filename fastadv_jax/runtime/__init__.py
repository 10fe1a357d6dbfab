"""Platform glue, below everything else: what the process needs before and around JAX.

xla_cpu (XLA:CPU flags and CPU-only code paths), distributed (several processes as one run),
compilation_cache (JAX's persistent cache for the command lines), cli_logging (a quiet console),
plugins (importing code from outside the package). Imports nothing else of fastadv_jax.
"""
