"""fastadv_jax: fast adversarial training and GradAlign in JAX/Flax.

A batch travels: datasets (host) -> parallel (device placement) -> train_step (augment,
methods/ perturbation, loss with gradalign, cross-device update) -> monitoring (diagnostics,
early stopping, overfitting flag) -> evaluation (final) -> train (results.json). xla_cpu holds
what exists only for XLA:CPU. README "How the code fits together" has the module list.
"""

__version__ = "0.1.0"
