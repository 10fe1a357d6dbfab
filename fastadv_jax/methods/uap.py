"""FGSM-UAP, FGSM-CUAP and FGSM-FUAP: FGSM from universal perturbations learned during training
(fzjcdt/fgsm_uap fat/fgsm_one_uap.py, fgsm_class_uap.py, fgsm_uap.py; FastAT_Benchmark
fast_at/fgsm_uap.py, fgsm_cuap.py, fgsm_fuap.py).

Run-level state: K universal perturbations u (K = 1 for UAP, one per class for CUAP, `n_uaps`
(50) for FUAP) of radius `eps_u` (10/255, pixel units in all the authors' code, so wider than
eps = 8/255: the start is then cut to the eps-ball), and a momentum buffer for each. Example i
starts from its u_k (k = 0; its label; its assigned one):
  x0 = Proj(x + u_k), g = grad CE_LS(f(x0)), x_adv = Proj(x0 + `alpha` * eps * sign g),
with Proj onto the eps-ball around x and [0, 1]. Loss CE_LS(f(x_adv)) + `lam` (10) * MSE(f(x_adv),
f(x0)), the mean over the global batch and the classes, gradients through both outputs.
After the step, with g_hat = g / ||g||_1 (the norm of the whole global batch's gradient):
  m_k <- mean_{i: k_i = k} g_hat_i + `decay` (0.3) m_k,  u_k <- clip(u_k + eps_u sign m_k, +-eps_u)
for the k present in the global batch (the others keep u_k and m_k); so u stays in {0, +-eps_u}.
The u start as eps_u * sign(U(-eps_u, eps_u)), drawn at the first step. CE_LS is the project's
cross-entropy with `config.label_smoothing` (the benchmark's 0.4; the attack's with
`label_smoothing_attack`).

FUAP assigns the UAP by the features: x_r = clip01(x + U(-eps, eps)); the model's penultimate
features at x_r (no gradient, train-mode BatchNorm) feed an auxiliary head
Linear(features, n_uaps)-ReLU-Linear(n_uaps, classes), trained by its own Adam (`head_lr`, 1e-3;
PyTorch's defaults otherwise) on CE_LS of its output; k = argmax of the head's hidden layer before
the ReLU (with the head before its update), and x0 = Proj(x_r + u_k). The head and its Adam
moments live in the run-level state; its gradient is averaged over devices.

Differences from the authors' code: their feature pass updates the BatchNorm running statistics
(here, as for every attack pass, it does not); the head starts from PyTorch's default Linear
initialisation drawn from this run's key; f(x0) is recomputed inside the loss (one extra forward
pass; the authors reuse the attack's pass, the same value). The original repository's FUAP file
(fat/fgsm_uap.py) updates the momentum with -g_hat (towards a lower loss), its UAP and CUAP files
and the benchmark's three with +g_hat, as here. A batch whose gradient is exactly zero gives g_hat = 0
here (the authors' division would give NaN).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, losses, parallel, randomness
from fastadv_jax.methods.base import (AttackInputs, Method, ModelInfo, Passes, Perturbation,
                                      RegularizerInputs, RegularizerOutput, check)

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults


def _check_common(args) -> None:
  check(args.eps_u > 0, "eps_u", f"must be > 0, got {args.eps_u}")
  check(0 <= args.decay < 1, "decay", f"must be in [0, 1), got {args.decay}")
  check(args.lam >= 0, "lam", f"must be >= 0, got {args.lam}")
  check(args.alpha > 0, "alpha", f"must be > 0, got {args.alpha}")


@dataclasses.dataclass(frozen=True)
class UAPArgs:
  """The authors' values (FGSM-UAP and FGSM-CUAP)."""
  eps_u: float = 10.0 / 255.0  # radius of the universal perturbations, pixel units
  decay: float = 0.3           # momentum decay
  lam: float = 10.0            # weight of MSE(f(x_adv), f(x0))
  alpha: float = 1.0           # FGSM step = alpha * eps

  def __post_init__(self):
    _check_common(self)


@dataclasses.dataclass(frozen=True)
class FUAPArgs:
  """The authors' values (FGSM-FUAP)."""
  eps_u: float = 10.0 / 255.0
  decay: float = 0.3
  lam: float = 10.0
  alpha: float = 1.0
  n_uaps: int = 50        # universal perturbations = the head's hidden width
  head_lr: float = 1e-3   # the head's Adam learning rate

  def __post_init__(self):
    _check_common(self)
    check(self.n_uaps >= 1, "n_uaps", f"must be >= 1, got {self.n_uaps}")
    check(self.head_lr > 0, "head_lr", f"must be > 0, got {self.head_lr}")


def _psum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _uap_state(n: int, info: ModelInfo) -> dict:
  zeros = jnp.zeros((n,) + tuple(info.input_shape), jnp.float32)
  return {"u": zeros, "m": zeros}


def init_head(key: jax.Array, feature_dim: int, hidden: int, num_classes: int) -> dict:
  """PyTorch's default Linear initialisation: weights and biases ~ U(+-1/sqrt(fan_in))."""
  ks = jax.random.split(key, 4)

  def u(k, shape, fan_in):
    b = 1.0 / jnp.sqrt(jnp.float32(fan_in))
    return jax.random.uniform(k, shape, jnp.float32, -b, b)

  return {"w1": u(ks[0], (feature_dim, hidden), feature_dim),
          "b1": u(ks[1], (hidden,), feature_dim),
          "w2": u(ks[2], (hidden, num_classes), hidden),
          "b2": u(ks[3], (num_classes,), hidden)}


def head_apply(head: dict, features: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(hidden layer before the ReLU, logits) of the auxiliary head."""
  hidden = features @ head["w1"] + head["b1"]
  return hidden, jax.nn.relu(hidden) @ head["w2"] + head["b2"]


def adam_step(params: Any, grads: Any, mu: Any, nu: Any, count: jax.Array, lr: float
              ) -> tuple[Any, Any, Any, jax.Array]:
  """One Adam step as torch.optim.Adam (and optax.adam) take it: (params, mu, nu, count)."""
  count = count + 1
  mu = jax.tree.map(lambda m, g: ADAM_B1 * m + (1 - ADAM_B1) * g, mu, grads)
  nu = jax.tree.map(lambda v, g: ADAM_B2 * v + (1 - ADAM_B2) * g * g, nu, grads)
  c1 = 1 - ADAM_B1 ** count.astype(jnp.float32)
  c2 = 1 - ADAM_B2 ** count.astype(jnp.float32)
  params = jax.tree.map(lambda p, m, v: p - lr * (m / c1) / (jnp.sqrt(v / c2) + ADAM_EPS),
                        params, mu, nu)
  return params, mu, nu, count


def _fuap_state(args: FUAPArgs, info: ModelInfo) -> dict:
  """UAPs and momenta, the head and its Adam moments: all zeros until the first step."""
  f, h, c = info.feature_dim, args.n_uaps, info.num_classes

  def zeros():
    return {"w1": jnp.zeros((f, h)), "b1": jnp.zeros((h,)), "w2": jnp.zeros((h, c)),
            "b2": jnp.zeros((c,))}

  return {**_uap_state(args.n_uaps, info), "head": zeros(), "mu": zeros(), "nu": zeros(),
          "count": jnp.zeros((), jnp.int32)}


def _start_uaps(state: dict, step: jax.Array, key: jax.Array, eps_u: float) -> jax.Array:
  """u at the first step: eps_u * sign(U(-eps_u, eps_u)) (the state is created as zeros)."""
  u = state["u"]
  return jax.lax.cond(
      step == 0,
      lambda: eps_u * jnp.sign(jax.random.uniform(jax.random.fold_in(key, 0), u.shape,
                                                  jnp.float32, -eps_u, eps_u)),
      lambda: u)


def update_uaps(u: jax.Array, m: jax.Array, g: jax.Array, k: jax.Array, args: Any,
                axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """The authors' update of the UAPs u (K, ...) and momenta m from the input gradients g (B, ...)
  at the starts and each example's UAP index k (B,), over the global batch."""
  g = g.astype(jnp.float32)
  l1 = _psum(jnp.sum(jnp.abs(g)), axis_name)
  g_hat = g / jnp.maximum(l1, jnp.finfo(jnp.float32).tiny)  # (a zero gradient stays zero)
  sums = _psum(jax.ops.segment_sum(g_hat, k, num_segments=u.shape[0]), axis_name)
  counts = _psum(jax.ops.segment_sum(jnp.ones(k.shape, jnp.float32), k,
                                     num_segments=u.shape[0]), axis_name)
  present = (counts > 0).reshape((-1,) + (1,) * (u.ndim - 1))
  mean = sums / jnp.maximum(counts, 1.0).reshape(present.shape)
  m_new = jnp.where(present, mean + args.decay * m, m)
  u_new = jnp.where(present, jnp.clip(u + args.eps_u * jnp.sign(m_new), -args.eps_u, args.eps_u),
                    u)
  return u_new, m_new


def _attack(inp: AttackInputs, start: jax.Array, k: jax.Array, u: jax.Array, m: jax.Array):
  """FGSM from x + start + u_k (projected); (delta, delta0, new u, new m)."""
  x, eps = inp.x, inp.eps
  delta0 = attacks.project(start + u[k], x, eps)
  g = attacks.input_grad(inp.loss_fn, x + delta0)
  delta = attacks.project(attacks.sign_step(delta0, g, inp.args.alpha * eps), x, eps)
  u, m = update_uaps(u, m, g, k, inp.args, inp.axis_name)
  return jax.lax.stop_gradient(delta), jax.lax.stop_gradient(delta0), u, m


def _perturb_by(assign):
  def perturb(inp: AttackInputs) -> Perturbation:
    if inp.state is None or inp.batch_key is None:
      raise ValueError("the UAP methods need their run-level state and a batch key (the train "
                       "step's)")
    u = _start_uaps(inp.state, inp.step, inp.batch_key, inp.args.eps_u)
    delta, delta0, u, m = _attack(inp, jnp.zeros_like(inp.x), assign(inp), u, inp.state["m"])
    return Perturbation(delta, state={"u": u, "m": m}, aux=delta0)
  return perturb


def _fuap_perturb(inp: AttackInputs) -> Perturbation:
  a, s, x, eps = inp.args, inp.state, inp.x, inp.eps
  if s is None or inp.batch_key is None or inp.features_fn is None:
    raise ValueError("fgsm_fuap needs its run-level state, a batch key and the model's features "
                     "(the train step's)")
  u = _start_uaps(s, inp.step, inp.batch_key, a.eps_u)
  head = jax.lax.cond(
      inp.step == 0,
      lambda: init_head(jax.random.fold_in(inp.batch_key, 1), s["head"]["w1"].shape[0],
                        a.n_uaps, s["head"]["w2"].shape[1]),
      lambda: s["head"])
  k_rand, _ = randomness.split_keys(inp.keys, 2)
  start = attacks.clip_to_box(randomness.uniform_like(k_rand, x, -eps, eps), x)
  features = jax.lax.stop_gradient(inp.features_fn(x + start)[0]).astype(jnp.float32)
  hidden, _ = head_apply(head, features)
  k = jnp.argmax(hidden, axis=-1)

  def head_loss(h):
    return jnp.mean(losses.cross_entropy(head_apply(h, features)[1], inp.y, inp.label_smoothing))

  grads = parallel.pmean(jax.grad(head_loss)(head), inp.axis_name)
  head, mu, nu, count = adam_step(head, grads, s["mu"], s["nu"], s["count"], a.head_lr)
  delta, delta0, u, m = _attack(inp, start, k, u, s["m"])
  return Perturbation(delta, state={"u": u, "m": m, "head": head, "mu": mu, "nu": nu,
                                    "count": count}, aux=delta0)


def _regularizer(inp: RegularizerInputs) -> RegularizerOutput:
  start_logits, _ = inp.forward(inp.params, inp.x + inp.aux)
  diff = losses.at_least_f32(inp.logits) - losses.at_least_f32(start_logits)
  local, value = parallel.global_mean(jnp.mean(jnp.square(diff), -1), inp.axis_name)
  lam = inp.args.lam
  return RegularizerOutput(lam * local, lam * value, inp.state)


# The attack step, and the training loss at x + delta and at the start x + delta0.
UAP_PASSES = Passes(input_grad=1, weight_grad=2)

METHODS = (
    Method("fgsm_uap", "FGSM-UAP: FGSM from one universal perturbation learned with momentum; "
           "CE + 10 x MSE(f(x_adv), f(x0))", _perturb_by(lambda inp: jnp.zeros_like(inp.y)),
           UAPArgs, regularizer=_regularizer,
           init_state_for=lambda a, info: _uap_state(1, info), presets={"fgsm_uap": {}},
           passes=lambda a: UAP_PASSES),
    Method("fgsm_cuap", "FGSM-CUAP: FGSM from the label's class-wise universal perturbation; "
           "CE + 10 x MSE(f(x_adv), f(x0))", _perturb_by(lambda inp: inp.y), UAPArgs,
           regularizer=_regularizer,
           init_state_for=lambda a, info: _uap_state(info.num_classes, info),
           presets={"fgsm_cuap": {}}, passes=lambda a: UAP_PASSES),
    Method("fgsm_fuap", "FGSM-FUAP: FGSM from a noisy start plus one of 50 universal "
           "perturbations picked by an auxiliary head on the features; CE + 10 x MSE",
           _fuap_perturb, FUAPArgs, regularizer=_regularizer, init_state_for=_fuap_state,
           presets={"fgsm_fuap": {}},
           passes=lambda a: UAP_PASSES._replace(forward=1)),  # + the features for the head
)
