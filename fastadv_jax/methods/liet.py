"""LIET: label-information elimination training (fzjcdt/LIET; FastAT_Benchmark fast_at/liet.py).

The loss everywhere (class-wise starts, attack, training) is a cross-entropy with random label
smoothing, rLS-CE: the true class gets 1 - s (s = `smoothing`, 0.6) and s is spread over the
other classes in proportion to fresh U(0, 1) draws, per example and per call.

Start: every `li_update` (20) iterations, with BatchNorm in eval mode, one gradient of rLS-CE at
the grey image 0.5 for each class c gives the class-wise perturbation LI_c = eps * sign(grad)
(kept in the run-level state as the sign). An example of class y starts from LI_y, of which each
element is replaced with probability r by U(-eps, eps) noise; r ~ U(`mask_min`, `mask_max`) and
a sign +-1 (which multiplies the start) are drawn once per batch. Then x0 = clip01(x + delta0),
one sign step of `alpha` * eps (eps) on rLS-CE at x0, projected onto the eps-ball around x and
[0, 1]. The loss is rLS-CE(f(x_adv)) + lambda * JS(p(x0), p(x_adv)), the Jensen-Shannon
divergence averaged over the global batch, with gradients through both outputs; lambda ramps
linearly with training progress to `lam_max` (100).

Differences from the authors' code:
- lambda: the authors add lam_max / epochs at the start of every epoch (lam_max * (e + 1) / E
  in epoch e); here it is lam_max * progress, per step, which equals theirs at each epoch's end
  and is meaningful for runs of any length.
- the class-wise starts are refreshed every `li_update` *global* steps; the authors count the
  batch index within the epoch (so each epoch starts with a refresh). LIET's own CIFAR-10 config
  refreshes every 10 batches, the benchmark's every 20 (the preset's).
- the start is kept as a sign and multiplied by the step's eps, so an eps warm-up never starts
  outside the ball (the same as the authors' with a constant eps).
- f(x0) is recomputed inside the loss (one extra forward pass); the authors reuse the attack's
  forward pass (the same value: same weights and batch statistics).
- for eps > 8/255 the authors' code draws the noise from U(-2 eps, 2 eps) and does not project
  onto the eps-ball: `noise` and `project` hold these choices (set from eps like theirs).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fastadv_jax import attacks, losses, parallel, randomness
from fastadv_jax.methods.base import (AttackInputs, CELossInputs, Method, ModelInfo, Passes,
                                      Perturbation, RegularizerInputs, RegularizerOutput, check)


@dataclasses.dataclass(frozen=True)
class LIETArgs:
  """The values of LIET's CIFAR-10 config in the 2026 benchmark (eps = 8/255)."""
  smoothing: float = 0.6  # s: the true class's target is 1 - s
  lam_max: float = 100.0  # final weight of the Jensen-Shannon term
  li_update: int = 20     # iterations between refreshes of the class-wise starts
  mask_min: float = 0.1   # the masking rate r ~ U(mask_min, mask_max), once per batch
  mask_max: float = 0.5
  noise: float = 1.0      # masked elements ~ U(-noise * eps, noise * eps)
  alpha: float = 1.0      # step = alpha * eps
  project: bool = True    # project x_adv onto the eps-ball around x (else only [0, 1])

  def __post_init__(self):
    check(0 <= self.smoothing < 1, "smoothing", f"must be in [0, 1), got {self.smoothing}")
    check(self.lam_max >= 0, "lam_max", f"must be >= 0, got {self.lam_max}")
    check(self.li_update >= 1, "li_update", f"must be >= 1, got {self.li_update}")
    check(0 <= self.mask_min <= self.mask_max <= 1, "mask_min",
          f"need 0 <= mask_min <= mask_max <= 1, got {self.mask_min}, {self.mask_max}")
    check(self.noise >= 0, "noise", f"must be >= 0, got {self.noise}")
    check(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")


def random_smoothed_targets(draws: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """(n, C) targets: 1 - s on the label, s over the other classes in proportion to `draws`
  (n, C), positive (U(0, 1) in LIET)."""
  onehot = jax.nn.one_hot(labels, draws.shape[-1], dtype=jnp.float32)
  others = jnp.where(onehot > 0, 0.0, draws.astype(jnp.float32))
  return onehot * (1.0 - smoothing) + smoothing * others / jnp.sum(others, -1, keepdims=True)


def random_smoothing_ce(logits: jax.Array, labels: jax.Array, keys: jax.Array,
                        smoothing: float) -> jax.Array:
  """Per-example rLS-CE with fresh U(0, 1) draws from the per-example `keys`."""
  if not smoothing:
    return losses.cross_entropy(logits, labels)
  draws = randomness.uniform_like(keys, logits, 0.0, 1.0)
  return losses.soft_cross_entropy(logits, random_smoothed_targets(draws, labels, smoothing))


def _class_keys(batch_key: jax.Array, n: int) -> jax.Array:
  return randomness.example_keys(jax.random.fold_in(batch_key, 0), jnp.arange(n))


def class_wise_signs(logits_fn, num_classes: int, input_shape: tuple[int, ...], key: jax.Array,
                     smoothing: float) -> jax.Array:
  """sign grad_x rLS-CE(f(0.5), c) for every class c: (C, *input_shape)."""
  grey = jnp.full((num_classes,) + tuple(input_shape), 0.5, jnp.float32)
  labels = jnp.arange(num_classes)
  keys = _class_keys(key, num_classes)
  g = jax.grad(lambda z: jnp.sum(random_smoothing_ce(logits_fn(z), labels, keys, smoothing)))(grey)
  return jnp.sign(g)


def _init_state(args: LIETArgs, info: ModelInfo):
  del args
  return {"li_sign": jnp.zeros((info.num_classes,) + tuple(info.input_shape), jnp.float32)}


def _perturb(inp: AttackInputs) -> Perturbation:
  a, x, y, eps = inp.args, inp.x, inp.y, inp.eps
  if inp.state is None or inp.batch_key is None:
    raise ValueError("liet needs its run-level state and a batch key (the train step's)")
  li = inp.state["li_sign"]
  eval_logits = inp.eval_logits_fn or inp.logits_fn
  li = jax.lax.cond(
      inp.step % a.li_update == 0,
      lambda: class_wise_signs(eval_logits, li.shape[0], li.shape[1:], inp.batch_key,
                               a.smoothing),
      lambda: li)
  # Per batch: the masking rate and the sign of the start.
  k_rate, k_sign = jax.random.split(jax.random.fold_in(inp.batch_key, 1))
  rate = jax.random.uniform(k_rate, (), jnp.float32, a.mask_min, a.mask_max)
  sign = jnp.where(jax.random.uniform(k_sign, ()) < 0.5, -1.0, 1.0)
  k_mask, k_noise, k_ce = randomness.split_keys(inp.keys, 3)
  masked = randomness.uniform_like(k_mask, x, 0.0, 1.0) < rate
  noise = randomness.uniform_like(k_noise, x, -a.noise * eps, a.noise * eps)
  delta0 = attacks.clip_to_box(sign * jnp.where(masked, noise, eps * li[y]), x)
  g = jax.grad(lambda z: jnp.sum(random_smoothing_ce(inp.logits_fn(z), y, k_ce, a.smoothing)))(
      x + delta0)
  delta = delta0 + a.alpha * eps * jnp.sign(g)
  delta = attacks.project(delta, x, eps) if a.project else attacks.clip_to_box(delta, x)
  return Perturbation(jax.lax.stop_gradient(delta), state={"li_sign": li},
                      aux=jax.lax.stop_gradient(delta0))


def _train_ce(inp: CELossInputs) -> jax.Array:
  return random_smoothing_ce(inp.logits, inp.y, inp.keys, inp.args.smoothing)


def js_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """Per-example 1/2 [KL(p || m) + KL(q || m)], m = (p + q) / 2, of two softmax outputs."""
  log_p = jax.nn.log_softmax(losses.at_least_f32(p_logits))
  log_q = jax.nn.log_softmax(losses.at_least_f32(q_logits))
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  log_m = jnp.log(jnp.clip((p + q) / 2.0, 0.0, 1.0))
  return 0.5 * (jnp.sum(p * (log_p - log_m), -1) + jnp.sum(q * (log_q - log_m), -1))


def liet_lambda(args: LIETArgs, progress: jax.Array) -> jax.Array:
  return args.lam_max * jnp.clip(progress, 0.0, 1.0)


def _regularizer(inp: RegularizerInputs) -> RegularizerOutput:
  start_logits, _ = inp.forward(inp.params, inp.x + inp.aux)
  local, value = parallel.global_mean(js_divergence(start_logits, inp.logits), inp.axis_name)
  lam = liet_lambda(inp.args, inp.progress)
  return RegularizerOutput(lam * local, lam * value, inp.state)


def _derived(config) -> dict:
  """The authors switch to noise U(-2 eps, 2 eps) and no eps-ball projection above 8/255."""
  large = float(config.eps) > 8.0 / 255.0 + 1e-9
  return {"noise": 2.0 if large else 1.0, "project": not large}


METHODS = (
    Method("liet", "LIET: class-wise starts from the grey image, partly masked by noise, one "
           "eps step; random-label-smoothing CE + ramped lambda x JS(start, adversarial)",
           _perturb, LIETArgs, train_ce=_train_ce, regularizer=_regularizer,
           init_state_for=_init_state, derived=_derived, presets={"liet": {}},
           passes=lambda a: Passes(input_grad=1, weight_grad=2)),
)
