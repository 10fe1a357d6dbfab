"""AutoAttack on models this library did not train: an NNX module, a linen model through
`functools.partial(model.apply, variables)`, and a PyTorch state_dict (.npz) imported into Flax.

Each model is first trained briefly on clean data (plain optax, so that there is accuracy to
attack), then attacked with standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square):

  .venv/bin/python experiments/examples/autoattack_own_model.py --steps=150 --eval_points=50

The state_dict part exports the library's `small_cnn` to the PyTorch layout (what
`python -m fastadv_jax.torch_export` writes as state_dict.npz), reads it back with
`torch_interop.read_state_dict` + `from_torch_state_dict` and attacks the result. Pass
`--state_dict=<export>/state_dict.npz --n_filters=W` to attack a real export instead (a
small_cnn of width W; PyTorch is not needed for .npz).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other examples

from fastadv_jax.runtime import xla_cpu  # noqa: E402

xla_cpu.apply()  # the CNN XLA:CPU flags

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fastadv_jax import autoattack  # noqa: E402
from fastadv_jax.interop import torch_interop  # noqa: E402
from fastadv_jax.training import model_config, saved_run  # noqa: E402
from fastadv_jax.configs import fashion_mnist  # noqa: E402

import examples_common as common  # noqa: E402
import own_loop_linen  # noqa: E402
import own_loop_nnx  # noqa: E402

IMAGE_SHAPE = (28, 28, 1)
Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, y; test x, y


def train_nnx_clean(model: nnx.Module, x: np.ndarray, y: np.ndarray, steps: int, batch: int,
                    lr: float) -> None:
  optimizer = nnx.Optimizer(model, optax.sgd(lr, momentum=0.9), wrt=nnx.Param)

  @nnx.jit
  def step(model: nnx.Module, optimizer: nnx.Optimizer, xb: jax.Array, yb: jax.Array) -> None:
    loss = lambda m: jnp.mean(  # noqa: E731
        optax.softmax_cross_entropy_with_integer_labels(m(xb), yb))
    optimizer.update(model, nnx.grad(loss)(model))

  for xb, yb in common.batches(x, y, batch, steps):
    step(model, optimizer, xb, yb)


def train_linen_clean(apply_fn: Callable, variables: dict, x: np.ndarray, y: np.ndarray,
                      steps: int, batch: int, lr: float) -> dict:
  """Clean SGD on a linen model taking `train=`; BatchNorm statistics updated if it has any."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.sgd(lr, momentum=0.9)
  opt = tx.init(params)

  @jax.jit
  def step(params: Any, stats: Any, opt: Any, xb: jax.Array, yb: jax.Array):
    def loss(p):
      logits, upd = apply_fn({"params": p, "batch_stats": stats}, xb, train=True,
                             mutable=["batch_stats"])
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb)), upd
    grads, upd = jax.grad(loss, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), upd.get("batch_stats", stats), opt

  for xb, yb in common.batches(x, y, batch, steps):
    params, stats, opt = step(params, stats, opt, xb, yb)
  return {"params": params, "batch_stats": stats}


def attack(name: str, logits_fn: Callable[[jax.Array], jax.Array], x: np.ndarray,
           y: np.ndarray, args: argparse.Namespace) -> autoattack.AutoAttackResult:
  t0 = time.time()
  res = autoattack.evaluate(logits_fn, x, y, args.eps, "standard", apgd_steps=args.apgd_steps,
                            fab_steps=args.apgd_steps, square_queries=args.square_queries,
                            progress=False)
  counts = ", ".join(f"{r.name}={r.robust_after}" for r in res.records)
  print(f"[{name}] clean_acc={res.clean_accuracy:.4f} autoattack_acc={res.accuracy:.4f} "
        f"(n={len(y)}, eps={args.eps:.4f}; robust after each attack: {counts}; "
        f"{time.time() - t0:.1f}s)")
  for w in res.warnings:
    print(f"[{name}] warning: {w}")
  return res


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=200, help="clean training steps per model")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lr", type=float, default=0.02)
  p.add_argument("--eps", type=float, default=0.1)
  p.add_argument("--eval_points", type=int, default=50)
  p.add_argument("--apgd_steps", type=int, default=100)
  p.add_argument("--square_queries", type=int, default=5000)
  p.add_argument("--state_dict", default="", help="a .npz state_dict of a small_cnn to attack "
                 "(default: export one of our own first)")
  p.add_argument("--n_filters", type=int, default=16, help="the state_dict's small_cnn width")
  p.add_argument("--models", default="nnx,linen,state_dict", help="which of the three to attack")
  p.add_argument("--synthetic", action="store_true", help="random data instead of Fashion-MNIST")
  args = p.parse_args(argv)
  which = set(args.models.split(","))
  data = common.load_data(args.synthetic, args.eval_points)
  fit = dict(steps=args.steps, batch=args.batch, lr=args.lr)

  if "nnx" in which:
    attack_nnx(data, args, fit)
  if "linen" in which:
    attack_linen(data, args, fit)
  if "state_dict" in which:
    attack_state_dict(data, args, fit)


def attack_nnx(data: Data, args: argparse.Namespace, fit: dict[str, Any]) -> None:
  """An NNX module: pass a pure function of x (split once, merged inside)."""
  x_train, y_train, x_test, y_test = data
  nnx_model = own_loop_nnx.CNN(nnx.Rngs(0))
  train_nnx_clean(nnx_model, x_train, y_train, **fit)
  graphdef, state = nnx.split(nnx_model)
  attack("nnx", lambda z: nnx.merge(graphdef, state)(z), x_test, y_test, args)


def attack_linen(data: Data, args: argparse.Namespace, fit: dict[str, Any]) -> None:
  """A linen model with BatchNorm: partial(model.apply, variables) runs it with train=False."""
  x_train, y_train, x_test, y_test = data
  linen_model = own_loop_linen.CNN()
  variables = linen_model.init(jax.random.key(1), jnp.zeros((1,) + IMAGE_SHAPE))
  variables = train_linen_clean(linen_model.apply, variables, x_train, y_train, **fit)
  attack("linen", functools.partial(linen_model.apply, variables), x_test, y_test, args)


def attack_state_dict(data: Data, args: argparse.Namespace, fit: dict[str, Any]) -> None:
  """A PyTorch state_dict (.npz, the library's export layout) -> Flax variables."""
  x_train, y_train, x_test, y_test = data
  config = fashion_mnist.get_config("standard")
  config.model, config.model_args.small_cnn.n_filters = "small_cnn", args.n_filters
  library_model = model_config.create_model(config, 10, half_precision=False)
  template = saved_run.variables_template(config)
  path = args.state_dict
  with tempfile.TemporaryDirectory(prefix="fastadv_export_") as tmp:
    if not path:
      trained = train_linen_clean(library_model.apply, template, x_train, y_train, **fit)
      path = os.path.join(tmp, "state_dict.npz")
      np.savez(path, **torch_interop.to_torch_state_dict(config, trained, IMAGE_SHAPE))
      print(f"exported small_cnn (width {args.n_filters}) to {path}")
    state_dict = torch_interop.read_state_dict(path)
  imported = torch_interop.from_torch_state_dict(config, state_dict, template, IMAGE_SHAPE)
  print(f"imported {len(state_dict)} tensors from {path}")
  attack("torch_state_dict", functools.partial(library_model.apply, imported), x_test, y_test,
         args)


if __name__ == "__main__":
  main()
