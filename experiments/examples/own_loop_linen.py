"""Fast adversarial training in your own loop with a Flax linen model (with BatchNorm) and
`flax.training.train_state.TrainState`.

BatchNorm: every training pass (the attack's, GradAlign's and the one at x + delta) normalises
with the batch's statistics (`train=True`, `mutable=["batch_stats"]`), but only the pass at
x + delta updates the running averages; the attack and GradAlign passes discard theirs.
Evaluation uses the running averages (`train=False`).

  .venv/bin/python experiments/examples/own_loop_linen.py --method=gradalign --steps=400
  .venv/bin/python experiments/examples/own_loop_linen.py --method=nfgsm --steps=400
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples_common.py

from fastadv_jax.runtime import xla_cpu  # noqa: E402

xla_cpu.apply()  # the CNN XLA:CPU flags, before JAX starts (inert on GPU)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402

from fastadv_jax import gradalign, methods  # noqa: E402
from fastadv_jax.methods.nfgsm import NFGSMArgs  # noqa: E402

import examples_common as common  # noqa: E402


class CNN(nn.Module):
  """conv16-BN-pool-conv32-BN-pool-fc100-fc10."""
  width: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    h = nn.max_pool(nn.relu(bn()(nn.Conv(self.width, (3, 3))(x))), (2, 2), (2, 2))
    h = nn.max_pool(nn.relu(bn()(nn.Conv(2 * self.width, (3, 3))(h))), (2, 2), (2, 2))
    h = nn.relu(nn.Dense(100)(h.reshape(h.shape[0], -1)))
    return nn.Dense(self.num_classes)(h)


class TrainState(train_state.TrainState):
  batch_stats: Any


def train_logits(state: TrainState, params: Any, x: jax.Array) -> tuple[jax.Array, Any]:
  """Logits with batch statistics, and the updated running averages (the caller decides)."""
  logits, upd = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                               train=True, mutable=["batch_stats"])
  return logits, upd["batch_stats"]


@functools.partial(jax.jit, static_argnames=("method",))
def train_step(state: TrainState, x: jax.Array, y: jax.Array, key: jax.Array, eps: jax.Array,
               lam: jax.Array, method: str) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update: gradalign = FGSM from zero + GradAlign; nfgsm = N-FGSM (its args record set
  explicitly here, to show where a hyperparameter goes)."""
  k_attack, k_reg = jax.random.split(key)

  def per_example_ce(params: Any, z: jax.Array) -> jax.Array:
    logits, _ = train_logits(state, params, z)  # statistics update discarded
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)

  loss_now = functools.partial(per_example_ce, state.params)
  if method == "gradalign":
    pert = methods.perturb("fgsm", loss_now, x, y, k_attack, eps)
  else:
    pert = methods.perturb("nfgsm", loss_now, x, y, k_attack, eps, args=NFGSMArgs(noise=2.0))

  def objective(params: Any) -> tuple[jax.Array, tuple[Any, jax.Array, jax.Array]]:
    logits, new_stats = train_logits(state, params, x + pert.delta)  # the only stats update
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    if method != "gradalign":
      return ce, (new_stats, ce, jnp.zeros(()))
    reg = gradalign.term(functools.partial(per_example_ce, params), x, k_reg, eps, lam,
                         g1=pert.clean_grad)
    return ce + reg.loss, (new_stats, ce, reg.value)

  (loss, (stats, ce, reg)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=stats)
  return state, {"loss": loss, "ce_adv": ce, "gradalign": reg}


def main(argv: list[str] | None = None) -> None:
  args = common.own_loop_parser(__doc__.splitlines()[0]).parse_args(argv)

  x_train, y_train, x_test, y_test = common.load_data(args.synthetic, args.eval_points, args.seed)
  model = CNN()
  variables = model.init(jax.random.key(args.seed), jnp.zeros((1, 28, 28, 1)))
  state = TrainState.create(
      apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
      tx=optax.sgd(optax.linear_onecycle_schedule(args.steps, args.lr), momentum=0.9))

  key = jax.random.key(args.seed)
  t0 = time.time()
  for i, (x, y) in enumerate(common.batches(x_train, y_train, args.batch, args.steps, args.seed)):
    eps = args.eps * min(1.0, (i + 1) / max(1, args.steps // 4))  # ramp over the first quarter
    state, m = train_step(state, x, y, jax.random.fold_in(key, i), jnp.float32(eps),
                          jnp.float32(args.lam), args.method)
    if i % max(1, args.steps // 4) == 0 or i == args.steps - 1:
      print(f"step {i:4d}  " + "  ".join(f"{k}={float(v):.4f}" for k, v in m.items()))
  print(f"train_time_s={time.time() - t0:.1f} ({args.method}, {args.steps} steps of "
        f"{args.batch}, eps={args.eps:.4f})")

  # Evaluation: running averages (train=False), a closure over the final variables.
  logits_fn = functools.partial(model.apply, {"params": state.params,
                                              "batch_stats": state.batch_stats})
  common.report(logits_fn, x_test, y_test, args.eps, args.pgd_steps, args.pgd_restarts,
                args.aa_points, args.apgd_steps, args.square_queries)


if __name__ == "__main__":
  main()
