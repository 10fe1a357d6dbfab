"""fastadv_jax: fast adversarial training and GradAlign in JAX/Flax.

Where things live (one concept per module):
  gradalign.py   the GradAlign regulariser (input gradients, masked cosine)
  attacks.py     FGSM / PGD / corner perturbations as init-step-project pure functions
  perturbations.py  the training-time inner maximisation chosen by config.method
  train_step.py  the jitted, pmapped step (gradient and BatchNorm averaging across devices)
  evaluation.py  float32 robust evaluation and catastrophic-overfitting diagnostics
  train.py       train_and_evaluate(config, workdir): loop, logging, checkpoints
  randomness.py  per-example noise, independent of the device split (fast on CPU)
  xla_cpu_flags.py  the XLA:CPU flags the command lines set (oneDNN convolutions)
"""

__version__ = "0.1.0"
