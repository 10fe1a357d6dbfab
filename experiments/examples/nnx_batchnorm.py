"""GradAlign and a method's attack on a Flax NNX model with BatchNorm in train mode.

`gradalign.term` and `methods.perturb` call your per-example loss inside `jax.grad`. An NNX
module with `nnx.BatchNorm` in train mode writes its running statistics on every call, and NNX
refuses that write from inside a JAX transform it did not set up:
`TraceContextError: Cannot mutate BatchStat from a different trace level`. The way through is
NNX's functional form: split the model once into its graph, parameters and the rest (the
batch statistics), and build a fresh copy with `nnx.merge(..., copy=True)` inside every
function that JAX transforms. Each pass then uses its own batch's statistics, as BatchNorm in
train mode does; the copies' writes to the running statistics are thrown away, except those of
the training forward pass, which the step puts back into the model (`nnx.update`). The attack
and GradAlign passes thus leave the running statistics alone, as the library's own trainer does.

  .venv/bin/python experiments/examples/nnx_batchnorm.py

tests/test_gradalign.py checks this step's GradAlign value against the same network written
as plain JAX.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fastadv_jax import gradalign, methods


class BNCNN(nnx.Module):
  """conv - BatchNorm - ReLU - linear, for 28 x 28 x 1 images."""

  def __init__(self, rngs: nnx.Rngs, width: int = 4, num_classes: int = 10):
    self.conv = nnx.Conv(1, width, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(width, rngs=rngs)
    self.head = nnx.Linear(28 * 28 * width, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(nnx.relu(self.bn(self.conv(x))).reshape(x.shape[0], -1))


def per_example_ce(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State, y: jax.Array):
  """x -> per-example cross-entropy of a fresh copy of the model (safe inside jax.grad)."""
  def ce(x: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params, rest, copy=True)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return ce


@nnx.jit(static_argnames=("method",))
def train_step(model: BNCNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array,
               key: jax.Array, eps: float, lam: float, method: str = "fgsm"
               ) -> tuple[jax.Array, jax.Array]:
  """One update: the method's perturbation, cross-entropy at x + delta, plus GradAlign (its
  clean gradient reused from FGSM where the method computed it). Returns (loss, GradAlign)."""
  k_attack, k_noise = jax.random.split(key)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pert = methods.perturb(method, per_example_ce(graphdef, params, rest, y), x, y, k_attack, eps)

  def loss(params: nnx.State):
    net = nnx.merge(graphdef, params, rest, copy=True)
    adv = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(net(x + pert.delta), y))
    ga = gradalign.term(per_example_ce(graphdef, params, rest, y), x, k_noise, eps, lam,
                        g1=pert.clean_grad)
    return adv + ga.loss, (ga.value, nnx.state(net, nnx.BatchStat))

  (value, (reg, stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  nnx.update(model, stats)  # the training pass's running statistics, as in any BatchNorm step
  optimizer.update(model, grads)
  return value, reg


def main() -> None:
  model = BNCNN(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
  x = jax.random.uniform(jax.random.key(1), (32, 28, 28, 1))
  y = jax.random.randint(jax.random.key(2), (32,), 0, 10)
  for i in range(3):
    loss, reg = train_step(model, optimizer, x, y, jax.random.key(3 + i), 0.1, 0.2)
    print(f"step {i}: loss {float(loss):.4f}, GradAlign {float(reg):.5f}, "
          f"running mean[0] {float(model.bn.mean.value[0]):+.5f}")


if __name__ == "__main__":
  main()
