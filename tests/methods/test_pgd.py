"""PGD and the benchmark's PGD-AT (methods/pgd.py): plain-CE PGD on the eval-mode model, a
linear model's closed-form worst case, the record's args and start."""
import jax.numpy as jnp
import numpy as np

from fastadv_jax import attacks, losses, methods
from one_step_cases import D, N, attack_inputs, bn_model


def test_pgd_at_is_plain_ce_pgd_on_the_eval_mode_model():
  x, y, train_logits, eval_logits = bn_model()
  eps = 0.1
  args = methods.get("pgd_at").make_args({"steps": 3})
  inp = attack_inputs("pgd_at", x, y, train_logits, eval_logits, eps, args)
  assert inp.init == "uniform"
  delta = methods.get("pgd_at").perturb(inp).delta
  delta0 = attacks.init_delta("uniform", inp.keys, x, eps)
  eval_ce = lambda z: losses.cross_entropy(eval_logits(z), y)  # noqa: E731
  np.testing.assert_allclose(delta, attacks.pgd(eval_ce, x, eps, eps / 4, 3, delta0), atol=1e-6)
  train_ce = lambda z: losses.cross_entropy(train_logits(z), y)  # noqa: E731
  train_mode = attacks.pgd(train_ce, x, eps, eps / 4, 3, delta0)
  assert float(jnp.mean(jnp.abs(delta - train_mode) > 1e-3)) > 0.05


def test_pgd_at_on_a_linear_model_is_the_closed_form_worst_case():
  """Two classes, logits x.w_c: the CE's input gradient has the sign of (w_1 - w_0) for label 0
  and the opposite for label 1, everywhere; 10 steps of eps/4 from any start in the ball reach
  that vertex. The attack's CE is its own (the method's loss_fn here ascends the opposite)."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(2, int(np.prod(D)))), jnp.float32)
  x = jnp.asarray(rng.uniform(0.2, 0.8, size=(N,) + D), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, N), jnp.int32)
  logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w.T  # noqa: E731
  inp = attack_inputs("pgd_at", x, y, logits_fn, logits_fn, 0.03)
  inp = inp._replace(loss_fn=lambda z: -losses.cross_entropy(logits_fn(z), y))
  delta = methods.get("pgd_at").perturb(inp).delta
  g_sign = (jnp.sign(w[1] - w[0]).reshape(D)[None]
            * jnp.where(y == 0, 1.0, -1.0)[:, None, None, None])
  np.testing.assert_allclose(delta, 0.03 * g_sign, atol=1e-7)


def test_pgd_keeps_its_args_and_start():
  pgd = methods.get("pgd")
  assert pgd.default_init == "zero"
  assert (pgd.default_args().steps, pgd.default_args().alpha) == (10, 0.2)
  assert methods.presets()["pgd_at"] == ("pgd_at", {})
