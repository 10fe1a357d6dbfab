"""Robust evaluation and catastrophic-overfitting diagnostics (docs/algorithms.md §4), and AutoAttack.

Always float32 with BatchNorm running statistics. Each chunk of examples is padded to a
multiple of the device count and spread over devices with pmap (parallel.py); randomness is per
example (keyed by the example's position in the evaluated set), so results do not depend on the
number of devices or on the chunk size. In a multi-process run every process evaluates its own
contiguous share of the points on its own devices, and the per-point results are gathered
(distributed.py), so every process returns the same numbers. PGD's step is `step_alpha * eps`
(config.eval_step_alpha, 1/4 in the paper's protocol). The threat model is the Evaluator's
`norm`: "Linf" (eps per pixel, the default and what training uses), "L2" (eps bounds the
Euclidean norm of the whole perturbation; PGD and AutoAttack only, attacks.py) or "L1" (the sum
of the absolute changes; AutoAttack's L1-APGD only: there is no L1 PGD).

Robust accuracy counts only points classified correctly without attack (PGD and AutoAttack
alike). Clean and robust accuracy (and AutoAttack) raise NonFiniteOutputError when the weights
or the logits on the evaluated points are NaN/Inf; the check rides on the clean forward pass.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import ml_collections

from fastadv_jax import attacks, autoattack, parallel
from fastadv_jax.autoattack import checks
from fastadv_jax.data import datasets
from fastadv_jax.runtime import distributed
from fastadv_jax.training import eval_programs

Variables = dict[str, Any]
NonFiniteOutputError = checks.NonFiniteOutputError  # NaN/Inf weights or logits: no accuracy


# --attack items that name an AutoAttack version (autoattack.VERSIONS).
_VERSION_ITEMS = {"autoattack": "standard", "autoattack-rand": "rand",
                  "autoattack-plus": "plus"}


def parse_attack_spec(spec: str) -> tuple[bool, tuple[str, ...]]:
  """'pgd' | 'autoattack' | 'autoattack-rand' | 'autoattack-plus' | AutoAttack components,
  comma-separated and combinable (e.g. 'pgd,autoattack', 'apgd-ce,apgd-t') -> (run PGD?,
  AutoAttack's attacks). A version alone gives exactly its attacks, so AutoAttack recognises it
  (runner.version_of: plus's restarts, rand's EOT).

  Components are those registered when it is called (plugins included). ValueError names the
  bad item."""
  known = autoattack.names()
  items = [s.strip() for s in str(spec).split(",") if s.strip()]
  if not items:
    raise ValueError("empty attack list: use pgd, autoattack, autoattack-rand, autoattack-plus "
                     f"or components ({', '.join(known)})")
  pgd, aa = False, []
  for item in items:
    if item == "pgd":
      pgd = True
    elif item in _VERSION_ITEMS:
      aa += autoattack.VERSIONS[_VERSION_ITEMS[item]]
    elif item in known:
      aa.append(item)
    else:
      raise ValueError(f"unknown attack {item!r}: choose pgd, autoattack, autoattack-rand, "
                       f"autoattack-plus or AutoAttack components ({', '.join(known)})")
  return pgd, tuple(dict.fromkeys(aa))


def _checked_norm(norm: str) -> str:
  """PGD's norms (attacks.NORMS), or L1 for AutoAttack alone (robust_points refuses it)."""
  if norm != "L1":
    attacks.check_norm(norm)
  return norm


def check_points(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
  """A one-line ValueError unless the points are in the Evaluator's domain: uint8 images (it
  divides them by 255: float images already in [0, 1] would be evaluated as nearly black) and
  integer labels in [0, num_classes), one per image."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"the Evaluator takes uint8 images in [0, 255], got dtype {images.dtype} "
                     "(for float images in [0, 1], use autoattack.evaluate or multiply by "
                     "255 and round)")
  autoattack.runner.check_labels(np.asarray(labels), len(images), num_classes)


class Evaluator:
  """Jitted, device-parallel evaluation of a model's variables on uint8 image arrays."""

  def __init__(self, model: nn.Module, batch_size: int = 500, devices: list | None = None,
               step_alpha: float = 0.25, norm: str = "Linf"):
    self.norm = _checked_norm(norm)
    if jnp.dtype(getattr(model, "dtype", jnp.float32)) != jnp.float32:
      raise ValueError(f"evaluation runs in float32, got a {jnp.dtype(model.dtype)} model: build "
                       "it with models.create_model(..., half_precision=False)")
    self.model = model
    self.step_alpha = float(step_alpha)  # PGD step = step_alpha * eps
    self.devices = devices or parallel.local_devices()
    self.n_dev = len(self.devices)
    self.batch_size = parallel.device_batch_size(batch_size, self.n_dev)
    pm = functools.partial(jax.pmap, devices=self.devices)
    # (variables, carry, x, y, idx, rng, eps, restart, steps): only `steps` is static.
    self._restart = pm(functools.partial(eval_programs.pgd_restart, model, self.step_alpha,
                                         self.norm),
                       in_axes=(None, 0, 0, 0, 0, None, None, None),
                       static_broadcasted_argnums=(8,))
    self._diag = pm(functools.partial(eval_programs.diagnostics, model, self.step_alpha),
                    in_axes=(None, 0, 0, 0, None, None), static_broadcasted_argnums=(6,))
    self._correct = pm(functools.partial(eval_programs.clean_correct, model),
                       in_axes=(None, 0, 0))
    self._num_classes: dict[tuple, int] = {}  # per image shape (_classes)

  def _prepared(self, variables: Variables, images: np.ndarray, labels: np.ndarray
                ) -> Variables:
    """`variables` on the first device, once the points are checked (check_points). Whatever
    they arrived as (host arrays, device 0's copy of a replicated state, a checkpoint's
    arrays), pmap keys its compiled programs on where its broadcast arguments live, so without
    this the last, the kept and the averaged weights of a run would each compile the same
    programs again."""
    variables = jax.device_put(variables, self.devices[0])
    check_points(images, labels, self._classes(variables, images))
    return variables

  def _classes(self, variables: Variables, images: np.ndarray) -> int:
    """The model's number of logits for images of this shape (traced once, not run)."""
    shape = tuple(images.shape[1:])
    if shape not in self._num_classes:
      apply_fn = lambda v, x, _key: self.model.apply(v, x, train=False)  # noqa: E731
      self._num_classes[shape] = autoattack.output_classes(apply_fn, variables, shape)
    return self._num_classes[shape]

  def _chunks(self, images: np.ndarray, labels: np.ndarray):
    """Yields (m, x, y, pos) over this process's share of the points: chunks padded to a
    multiple of the device count, split per device; pos = positions in the whole set."""
    start, stop = distributed.point_range(len(labels))
    n = stop - start
    for m, idx in parallel.chunks_for_devices(n, self.batch_size, self.n_dev):
      pos = start + idx
      yield m, *parallel.shard((images[pos], labels[pos], pos.astype(np.int32)), self.n_dev)

  def _per_point(self, outs: list, n: int):
    """The per-point outputs of this process's chunks -> those of all n points."""
    return distributed.gather_points(jax.tree.map(lambda *v: np.concatenate(v), *outs), n)

  def _clean_pass(self, variables: Variables, images: np.ndarray, labels: np.ndarray
                  ) -> tuple[list[jax.Array], np.ndarray]:
    """The forward pass at the unperturbed points: per chunk, the device-sharded correctness
    (PGD's starting `robust`), and every point's correctness. Raises NonFiniteOutputError when
    the weights, or the logits of any point, are not finite; the flags of all points are
    gathered first, so every process of a multi-process run raises alike."""
    checks.check_finite_weights(variables)
    sharded, outs = [], []
    for m, x, y, _ in self._chunks(images, labels):
      correct, finite = self._correct(variables, x, y)
      sharded.append(correct)
      outs.append(parallel.unshard((correct, finite), m))
    correct, finite = self._per_point(outs, len(labels))
    checks.check_finite_logits(finite)
    return sharded, correct

  def robust_points(self, variables: Variables, images: np.ndarray, labels: np.ndarray,
                    eps: float, steps: int, restarts: int, rng: jax.Array,
                    progress: bool = False) -> np.ndarray:
    """PGD-`steps`-`restarts` per-point verdicts, (n,) bool indexed by position (step
    `step_alpha * eps`, uniform start, worst case over restarts): True where the point is
    classified correctly without attack and at every restart's endpoint. 0 restarts is refused
    (it would report every correctly classified point as robust); NonFiniteOutputError as
    clean_accuracy. In a multi-process run, every process returns all n verdicts. `progress`:
    a bar of the points done and robust so far (process 0's own points)."""
    if restarts < 1 or steps < 1:
      raise ValueError(f"PGD needs steps >= 1 and restarts >= 1, got {steps} and {restarts}")
    attacks.check_norm(self.norm)  # no L1 PGD
    variables = self._prepared(variables, images, labels)
    clean, _ = self._clean_pass(variables, images, labels)
    start, stop = distributed.point_range(len(labels))
    bar = _PointsBar(f"PGD-{steps}-{restarts}", stop - start, restarts, progress)
    robust = []
    for (m, x, y, pos), clean_chunk in zip(self._chunks(images, labels), clean):
      carry = attacks.restarts_init(jnp.zeros(x.shape, jnp.float32), jnp.asarray(y), clean_chunk)
      for r in range(restarts):  # host loop: one small compiled program reused per restart
        carry = self._restart(variables, carry, x, y, pos, rng, jnp.float32(eps),
                               jnp.int32(r), steps)
        bar.restart_done(r, carry[2])
      robust.append(parallel.unshard(carry[2], m))
      bar.chunk_done(robust[-1])
    bar.close()
    return self._per_point(robust, len(labels))

  def robust_accuracy(self, variables: Variables, images: np.ndarray, labels: np.ndarray,
                      eps: float, steps: int, restarts: int, rng: jax.Array,
                      progress: bool = False) -> float:
    """PGD-`steps`-`restarts` accuracy: the share of `robust_points`, so never above clean
    accuracy."""
    return float(np.mean(self.robust_points(variables, images, labels, eps, steps, restarts,
                                            rng, progress)))

  def diagnostics(self, variables: Variables, images: np.ndarray, labels: np.ndarray,
                  eps: float, rng: jax.Array, pgd_steps: int = 10) -> dict[str, float]:
    """Clean / FGSM / PGD accuracy, loss, gradient alignment and cos(delta_FGSM, delta_PGD):
    the L-inf training diagnostics (an L2 Evaluator refuses them)."""
    if self.norm != "Linf":
      raise ValueError(f"diagnostics are L-inf only, this Evaluator's norm is {self.norm}")
    variables = self._prepared(variables, images, labels)
    outs = [parallel.unshard(self._diag(variables, x, y, pos, rng, jnp.float32(eps), pgd_steps), m)
            for m, x, y, pos in self._chunks(images, labels)]
    return eval_programs.diagnostics_summary(self._per_point(outs, len(labels)))

  def autoattack(self, variables: Variables, images: np.ndarray, labels: np.ndarray, eps: float,
                 attacks_: str | tuple[str, ...] = "standard", seed: int = 0,
                 pgd_acc: float | None = None, progress: bool = True, **settings: int
                 ) -> autoattack.AutoAttackResult:
    """AutoAttack (autoattack/) on uint8 images in this evaluator's norm, over its devices (and,
    in a multi-process run, over every process's: each attacks its share of the points and
    every process returns the gathered result). `settings`: AutoAttack's apgd_steps,
    fab_steps, square_queries (its defaults, the reference's, where absent)."""
    variables = self._prepared(variables, images, labels)
    apply_fn = lambda v, x, _key: self.model.apply(v, x, train=False)  # noqa: E731
    aa = autoattack.AutoAttack(
        apply_fn, self._classes(variables, images), eps,
        attacks_, batch_size=self.batch_size, devices=self.devices, progress=progress,
        norm=self.norm, **settings)
    return aa.run(variables, np.asarray(images, np.float32) / 255.0, labels, seed, pgd_acc)

  def clean_points(self, variables: Variables, images: np.ndarray, labels: np.ndarray
                   ) -> np.ndarray:
    """Per point, (n,) bool indexed by position: classified correctly without perturbation (one
    forward pass, no gradient). NonFiniteOutputError when the weights or the logits of any
    point are NaN/Inf."""
    variables = self._prepared(variables, images, labels)
    return self._clean_pass(variables, images, labels)[1]

  def clean_accuracy(self, variables: Variables, images: np.ndarray, labels: np.ndarray
                     ) -> float:
    """Accuracy on the unperturbed images: the share of `clean_points`."""
    return float(np.mean(self.clean_points(variables, images, labels)))


class _PointsBar:
  """The final evaluation's progress in the trainer's style (a tqdm bar, process 0 only): the
  points done and robust so far, and the restart the current chunk is at. Off, it does
  nothing; on, it waits for each restart to finish (the same programs run, only the host
  waits), so the bar moves as the work does."""

  def __init__(self, name: str, n: int, restarts: int, show: bool):
    self.bar = autoattack.runner.points_bar(name, n, show)
    self.restarts, self.done, self.robust = restarts, 0, 0

  def restart_done(self, r: int, robust: jax.Array) -> None:
    if self.bar is not None:
      jax.block_until_ready(robust)
      self._postfix(f"restart {r + 1}/{self.restarts}")

  def chunk_done(self, robust: np.ndarray) -> None:
    if self.bar is not None:
      self.done += len(robust)
      self.robust += int(np.sum(robust))
      self.bar.update(len(robust))
      self._postfix("")

  def _postfix(self, where: str) -> None:
    share = f"{self.robust / self.done:.3f} of {self.done}" if self.done else "-"
    self.bar.set_postfix_str(f"robust {share}" + (f", {where}" if where else ""))

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def final_evaluation(config: ml_collections.ConfigDict, evaluator: Evaluator, variables: dict,
                     test_split: datasets.Split, rng: jax.Array) -> dict:
  """Clean accuracy and the attacks of `config.final_attack` on the first n test points:
  PGD-(final_pgd_steps)-(final_pgd_restarts) and/or AutoAttack (seeded by config.seed)."""
  n = len(test_split) if config.n_final_eval == -1 else min(config.n_final_eval, len(test_split))
  x, y = test_split.images[:n], test_split.labels[:n]
  run_pgd, aa_attacks = parse_attack_spec(config.final_attack)
  out = {"clean_acc": evaluator.clean_accuracy(variables, x, y), "eps": config.eps, "n_eval": n}
  if run_pgd:
    out.update(pgd_acc=evaluator.robust_accuracy(variables, x, y, config.eps,
                                                 config.final_pgd_steps,
                                                 config.final_pgd_restarts, rng,
                                                 progress=config.progress_bar),
               pgd_steps=config.final_pgd_steps, pgd_restarts=config.final_pgd_restarts)
  if aa_attacks:
    result = evaluator.autoattack(variables, x, y, config.eps, aa_attacks, config.seed,
                                  out.get("pgd_acc"), progress=config.progress_bar)
    out.update(result.summary())
  return out
