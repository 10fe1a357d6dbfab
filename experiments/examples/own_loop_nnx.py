"""Fast adversarial training in your own loop with a Flax NNX model and optax.

No project trainer: the library supplies only the pieces (`methods.perturb` for the attack,
`gradalign.term` for the regulariser, `attacks.pgd_with_restarts` and `autoattack.evaluate` for
the evaluation), each taking a per-example loss closed over your model.

  .venv/bin/python experiments/examples/own_loop_nnx.py --method=gradalign --steps=400
  .venv/bin/python experiments/examples/own_loop_nnx.py --method=nfgsm --steps=400
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples_common.py

from fastadv_jax.runtime import xla_cpu  # noqa: E402

xla_cpu.apply()  # the CNN XLA:CPU flags, before JAX starts (inert on GPU)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fastadv_jax import gradalign, methods  # noqa: E402

import examples_common as common  # noqa: E402


class CNN(nnx.Module):
  """conv16-pool-conv32-pool-fc100-fc10 (no BatchNorm: every pass is a pure function of x)."""

  def __init__(self, rngs: nnx.Rngs, width: int = 16, num_classes: int = 10):
    self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(7 * 7 * 2 * width, 100, rngs=rngs)
    self.fc2 = nnx.Linear(100, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    pool = lambda h: nnx.max_pool(h, (2, 2), (2, 2))  # noqa: E731
    h = pool(nnx.relu(self.conv1(x)))
    h = pool(nnx.relu(self.conv2(h)))
    h = nnx.relu(self.fc1(h.reshape(h.shape[0], -1)))
    return self.fc2(h)


def per_example_ce(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y)


@nnx.jit(static_argnames=("method",))
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array,
               key: jax.Array, eps: jax.Array, lam: jax.Array, method: str
               ) -> dict[str, jax.Array]:
  """One update. gradalign: FGSM from zero + GradAlign (reusing FGSM's clean gradient as g1);
  nfgsm: N-FGSM. The perturbation is under stop_gradient; GradAlign is differentiated through
  (double backpropagation), so it lives inside the function nnx.grad differentiates."""
  k_attack, k_reg = jax.random.split(key)
  loss_at_current = lambda z: per_example_ce(model, z, y)  # noqa: E731
  pert = methods.perturb("fgsm" if method == "gradalign" else "nfgsm", loss_at_current, x, y,
                         k_attack, eps)

  def objective(m: CNN) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    loss_at_m = lambda z: per_example_ce(m, z, y)  # noqa: E731
    ce = jnp.mean(loss_at_m(x + pert.delta))
    if method != "gradalign":
      return ce, (ce, jnp.zeros(()))
    reg = gradalign.term(loss_at_m, x, k_reg, eps, lam, g1=pert.clean_grad)
    return ce + reg.loss, (ce, reg.value)

  (loss, (ce, reg)), grads = nnx.value_and_grad(objective, has_aux=True)(model)
  optimizer.update(model, grads)
  return {"loss": loss, "ce_adv": ce, "gradalign": reg}


def main(argv: list[str] | None = None) -> None:
  args = common.own_loop_parser(__doc__.splitlines()[0]).parse_args(argv)

  x_train, y_train, x_test, y_test = common.load_data(args.synthetic, args.eval_points, args.seed)
  model = CNN(nnx.Rngs(args.seed))
  schedule = optax.linear_onecycle_schedule(args.steps, args.lr)  # cyclic lr, as the paper
  optimizer = nnx.Optimizer(model, optax.sgd(schedule, momentum=0.9), wrt=nnx.Param)

  key = jax.random.key(args.seed)
  t0 = time.time()
  for i, (x, y) in enumerate(common.batches(x_train, y_train, args.batch, args.steps, args.seed)):
    # eps ramped over the first quarter: FGSM-type training on Fashion-MNIST is unstable without.
    eps = args.eps * min(1.0, (i + 1) / max(1, args.steps // 4))
    m = train_step(model, optimizer, x, y, jax.random.fold_in(key, i), jnp.float32(eps),
                   jnp.float32(args.lam), args.method)
    if i % max(1, args.steps // 4) == 0 or i == args.steps - 1:
      print(f"step {i:4d}  " + "  ".join(f"{k}={float(v):.4f}" for k, v in m.items()))
  print(f"train_time_s={time.time() - t0:.1f} ({args.method}, {args.steps} steps of "
        f"{args.batch}, eps={args.eps:.4f})")

  model.eval()
  graphdef, state = nnx.split(model)
  logits_fn = lambda z: nnx.merge(graphdef, state)(z)  # noqa: E731  (pure: jit/grad-safe)
  common.report(logits_fn, x_test, y_test, args.eps, args.pgd_steps, args.pgd_restarts,
                args.aa_points, args.apgd_steps, args.square_queries)


if __name__ == "__main__":
  main()
