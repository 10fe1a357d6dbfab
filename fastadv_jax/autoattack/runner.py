"""AutoAttack's composition: each attack runs only on the points every earlier attack missed; a
point is robust only if all attacks fail; the first adversarial example found is kept.

Points are compacted after every attack (and every target class) and spread over the local
devices with pmap, like the Evaluator. Randomness is keyed by a point's position in the evaluated
set, so results do not depend on the device count, the chunk size or which points are left, and
by the attack (attack_key_id), not its place in the list; an attack restarted (restarts=) runs
again on the points still robust with keys of its own per restart. In a
multi-process run (distributed.py) each process attacks its own contiguous share of the points
on its own devices, and the per-point results are gathered at the end, so every process returns
the same result as one process with all the devices would.
Every attack is a `component.Component` record looked up by name in the live registry: this
module asks the record for its state, iterations, blocks and verdicts; only the versions
and the reference's Square check name attacks.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fastadv_jax import parallel
from fastadv_jax.runtime import distributed
# The built-in components register themselves when their modules are imported.
from fastadv_jax.autoattack import apgd, fab, square  # noqa: F401  pylint: disable=unused-import
from fastadv_jax.autoattack import checks, component, device_runs
from fastadv_jax.autoattack import draws as draws_lib
from fastadv_jax.autoattack import losses as aa_losses
from fastadv_jax.autoattack.checks import NonFiniteOutputError

__all__ = ["ATTACKS", "GRADIENT_BASED", "RESTARTS", "TARGETED", "VERSIONS", "ApplyFn",
           "AttackRecord", "AutoAttack", "AutoAttackResult", "NonFiniteOutputError",
           "attack_key_id", "attack_records", "check_classes", "check_norm", "check_restarts",
           "output_classes", "parse_attacks", "version_of", "without_norm"]

ApplyFn = device_runs.ApplyFn  # (variables, x, key) -> logits

# The reference's versions, by component name (resolved in the live registry when used), in the
# reference's order.
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
            "rand": ("apgd-ce", "apgd-dlr"),
            "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")}
# Runs per attack on the points still robust where a version has more than one (the reference's
# n_restarts; its plus version keeps 9 target classes and 5000 Square queries, the defaults).
RESTARTS = {"plus": {"apgd-ce": 5, "apgd-dlr": 5, "fab": 5}}
# The reference's L1 settings (its standard version under norm="L1"): APGD-CE runs 5 times and
# the targeted attacks take 5 target classes, whatever the list (restarts= and
# n_target_classes= override them).
L1_RESTARTS = {"apgd-ce": 5}
L1_TARGET_CLASSES = 5

# The number each attack's randomness is folded by: its position in `standard` (else in
# `rand`), as when keys followed the position in the list, so those two versions keep their
# results; for any other attack a stable number from its name. An attack draws the same
# per-point randomness in every list it runs in (plus runs standard's attacks exactly as
# standard does on the points still robust, so it can never be weaker on them).
_KEY_IDS = {"apgd-ce": 0, "apgd-t": 1, "fab-t": 2, "square": 3, "apgd-dlr": 1}


def attack_key_id(name: str) -> int:
  """The number `name`'s randomness is folded by (see _KEY_IDS): apgd-dlr shares 1 with apgd-t,
  whose target ranks (>= 2) never meet its rank 0."""
  if name in _KEY_IDS:
    return _KEY_IDS[name]
  return (1 << 16) + zlib.crc32(name.encode()) % ((1 << 31) - (1 << 16))

def __getattr__(name: str):
  """ATTACKS / TARGETED / GRADIENT_BASED: derived from the live registry on every access, so a
  component registered later (a plugin) is in them."""
  regs = component.components()
  if name == "ATTACKS":
    return tuple(regs)
  if name == "TARGETED":
    return tuple(n for n, c in regs.items() if c.targeted)
  if name == "GRADIENT_BASED":
    return tuple(n for n, c in regs.items() if c.gradient_based)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class AttackRecord:
  name: str
  attacked: int      # points it ran on (still robust before it), over all processes
  robust_after: int  # points still robust after it, over all processes
  seconds: float     # this process's wall time
  process_seconds: tuple[float, ...] = ()  # every process's wall time, in process order


def attack_records(attacks: Sequence[str], clean: np.ndarray, broken_by: np.ndarray,
                   seconds: Sequence[float], process_seconds: np.ndarray | None = None
                   ) -> list[AttackRecord]:
  """The per-attack records from the per-point verdicts: attack a ran on the clean points no
  earlier attack broke and left robust those it did not break either; from the gathered arrays
  of a multi-process run these are the global counts, whichever process attacked which point.
  `seconds`: this process's wall time per attack; `process_seconds`: (processes, attacks), every
  process's (default: this process's only)."""
  clean, broken_by = np.asarray(clean, bool), np.asarray(broken_by)
  every = np.asarray(seconds if process_seconds is None else process_seconds, float)
  every = every.reshape(-1, len(attacks))
  robust_before = lambda a: clean & ~((broken_by >= 0) & (broken_by < a))  # noqa: E731
  return [AttackRecord(name, int(np.sum(robust_before(a))), int(np.sum(robust_before(a + 1))),
                       float(seconds[a]), tuple(float(s) for s in every[:, a]))
          for a, name in enumerate(attacks)]


@dataclasses.dataclass
class AutoAttackResult:
  clean: np.ndarray       # (n,) bool: correctly classified without perturbation
  robust: np.ndarray      # (n,) bool: correct under every attack
  x_adv: np.ndarray       # (n, ...) the first adversarial example found, else the clean point
  broken_by: np.ndarray   # (n,) int: index into `attacks` of the attack that broke it, else -1
  attacks: tuple[str, ...]
  records: list[AttackRecord]
  warnings: list[str]
  eps: float
  norm: str = "Linf"
  # A randomised model evaluated over `draws` > 1 model draws (draws.py): per point, the share
  # of fresh draws correct on the kept candidate (`x_adv`), of the clean point's draws, and of
  # the kept candidate's selection draws (PR #105's number). Then `clean` / `robust` mean
  # "correct in at least one draw" (clean point / kept candidate) and `broken_by` names the
  # attack after which no draw classified the kept candidate correctly.
  draws: int = 1
  robust_rate: np.ndarray | None = None
  clean_rate: np.ndarray | None = None
  selection_rate: np.ndarray | None = None

  @property
  def accuracy(self) -> float:
    return float(np.mean(self.robust if self.robust_rate is None else self.robust_rate))

  @property
  def clean_accuracy(self) -> float:
    return float(np.mean(self.clean if self.clean_rate is None else self.clean_rate))

  def summary(self) -> dict:
    """The results.json fields: accuracy, per-attack robust counts and times (this process's,
    and every process's in process order: a one-element list in a single-process run, so the
    field is always there), warnings."""
    out = {
        "autoattack_acc": self.accuracy, "autoattack_clean_acc": self.clean_accuracy,
        "autoattack_eps": self.eps, "autoattack_norm": self.norm,
        "autoattack_n": int(self.robust.size),
        "autoattack_attacks": list(self.attacks),
        "autoattack_robust_counts": {r.name: r.robust_after for r in self.records},
        "autoattack_seconds": {r.name: round(r.seconds, 3) for r in self.records},
        "autoattack_seconds_per_process": {r.name: [round(s, 3) for s in r.process_seconds]
                                           for r in self.records},
        "autoattack_warnings": list(self.warnings),
    }
    if self.draws > 1:  # a randomised model: the rule, K, and PR #105's own number
      out.update(autoattack_draws=self.draws, autoattack_draws_rule=draws_lib.RULE,
                 autoattack_acc_selection=float(np.mean(self.selection_rate)))
    return out


def check_classes(attacks: Sequence[str], num_classes: int) -> None:
  """ValueError unless the attacks can run on a `num_classes`-way classifier."""
  if num_classes < 2:
    raise ValueError(f"need at least 2 classes, got {num_classes}")
  if (any(component.get(a).targeted for a in attacks)
      and num_classes < aa_losses.MIN_CLASSES_TARGETED):
    raise ValueError(aa_losses.targeted_error(num_classes))


def without_norm(attacks: Sequence[str], norm: str) -> list[str]:
  """The attacks of the list that do not implement `norm` (Component.norms)."""
  return [a for a in attacks if norm not in component.get(a).norms]


def check_norm(attacks: Sequence[str], norm: str, eps: float) -> None:
  """ValueError unless every attack implements `norm` and eps is a radius it can take: in
  (0, 1] for L-inf (pixel units), positive for L2 (the whole perturbation's Euclidean norm)."""
  if norm not in component.NORMS:
    raise ValueError(f"norm must be one of {', '.join(component.NORMS)}, got {norm!r}")
  if norm == "Linf" and not 0.0 < eps <= 1.0:
    raise ValueError(f"eps must be in (0, 1] (pixel units, e.g. 8/255), got {eps}")
  if norm in ("L2", "L1") and not (eps > 0.0 and math.isfinite(eps)):
    example = "0.5" if norm == "L2" else "12"
    raise ValueError(f"eps must be a finite number > 0 (the {norm} norm of the perturbation, "
                     f"e.g. {example}), got {eps}")
  unsupported = without_norm(attacks, norm)
  if unsupported:
    raise ValueError(f"attack {unsupported[0]!r} does not implement the {norm} threat model "
                     f"(it implements {', '.join(component.get(unsupported[0]).norms)})")
  if norm == "L1" and version_of(attacks) == "rand":  # the reference: plain L1-APGD, EOT
    raise ValueError("the rand version under L1 (the reference's plain L1-APGD with EOT) is not "
                     "implemented: name the attacks, e.g. 'apgd-ce,apgd-t'")


def check_points(images: Any, labels: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(images as float32, labels as int32) once they are in AutoAttack's domain; otherwise a
  one-line ValueError: images in [0, 1] (eps is in those units, and the attacks clip to that
  box: uint8 images must be divided by 255 first), labels integers in [0, num_classes), one
  label per image, at least one point."""
  x, y = np.asarray(images), np.asarray(labels)
  check_labels(y, len(x), num_classes)
  if len(y) == 0:
    raise ValueError("no points to evaluate")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
    raise ValueError(f"images must be in [0, 1] (eps is in those units; divide uint8 images by "
                     f"255), got values in [{x.min()}, {x.max()}]")
  return x, y.astype(np.int32)


def check_labels(labels: np.ndarray, n_images: int, num_classes: int) -> None:
  """A one-line ValueError unless `labels` are one integer class index in [0, num_classes)
  per image (the AutoAttack runner's and the Evaluator's shared check)."""
  if labels.ndim != 1 or len(labels) != n_images:
    raise ValueError(f"labels must be one integer per image: {n_images} images, labels of "
                     f"shape {labels.shape}")
  if labels.dtype.kind not in "iu":
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}: one integer per "
                     "image, its class index")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise ValueError(f"labels must be class indices in [0, {num_classes}) for this "
                     f"{num_classes}-class model, got {bad}")


def output_classes(apply_fn: ApplyFn, variables: Any, image_shape: tuple) -> int:
  """The number of logits `apply_fn` gives for one image (traced, not run)."""
  probe = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  return int(jax.eval_shape(lambda z: apply_fn(variables, z, jax.random.key(0)), probe).shape[-1])


def parse_attacks(spec: str | Sequence[str]) -> tuple[str, ...]:
  """'standard' | 'rand' | 'plus' | a comma-separated list of registered components -> the
  attack names, validated against the live registry."""
  if isinstance(spec, str):
    if spec in VERSIONS:
      return VERSIONS[spec]
    spec = [s.strip() for s in spec.split(",") if s.strip()]
  names = tuple(spec)
  known = component.names()
  bad = [s for s in names if s not in known]
  if bad or not names:
    raise ValueError(f"unknown attack {bad[0] if bad else spec!r}: choose 'standard', 'rand', "
                     f"'plus' or a comma-separated list of {', '.join(known)}")
  return names


def version_of(attacks: Sequence[str]) -> str | None:
  """The version (a VERSIONS key) whose attacks are exactly `attacks`, in order, else None."""
  return next((v for v, names in VERSIONS.items() if names == tuple(attacks)), None)


def _check_distinct_keys(attacks: Sequence[str]) -> None:
  """ValueError unless every attack of the list draws its own randomness: an attack listed
  twice would repeat its first run exactly (restarts run it again with fresh keys)."""
  seen: dict[tuple[int, bool], str] = {}
  for name in attacks:
    slot = (attack_key_id(name), component.get(name).targeted)
    if slot in seen:
      if seen[slot] == name:
        raise ValueError(f"attack {name!r} is listed twice: to run it again on the points still "
                         f"robust use restarts={{{name!r}: 2}}")
      raise ValueError(f"attacks {seen[slot]!r} and {name!r} would draw the same randomness "
                       "(runner.attack_key_id): rename one")
    seen[slot] = name


def check_restarts(attacks: Sequence[str], restarts: Mapping[str, int] | None = None,
                   norm: str = "Linf") -> dict[str, int]:
  """Runs per attack: 1, or the version's (RESTARTS) when `attacks` is a version, or the L1
  settings' (L1_RESTARTS) under norm="L1", overridden by `restarts` {name: n >= 1}; ValueError
  for a name not run or a bad count."""
  version = version_of(attacks)
  default = L1_RESTARTS if norm == "L1" else RESTARTS.get(version, {})
  runs = {name: default.get(name, 1) for name in attacks}
  for name, n in dict(restarts or {}).items():
    if name not in runs:
      raise ValueError(f"restarts: {name!r} is not among the attacks run "
                       f"({', '.join(dict.fromkeys(attacks))})")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ValueError(f"restarts[{name!r}] must be an integer >= 1, got {n!r}")
    runs[name] = int(n)
  return runs


def _target_classes(given: int | None, norm: str) -> int | None:
  """n_target_classes: as given, else the reference's for `norm` (9; L1_TARGET_CLASSES)."""
  return given if given is not None else (L1_TARGET_CLASSES if norm == "L1" else 9)


def _pass_rng(rng: jax.Array, name: str, rank: int, restart: int) -> jax.Array:
  """The key of one run of an attack: folded by its attack_key_id (not its place in the list)
  and target rank; restarts after the first fold their number in too."""
  key = jax.random.fold_in(jax.random.fold_in(rng, attack_key_id(name)), rank)
  return key if restart == 0 else jax.random.fold_in(key, restart)


# draw_counts(key, pos, xs, y, draws) -> per point of pos, in how many of `draws` model draws
# the model classifies xs as y[pos] (DeviceRuns.draw_counts at the run's weights).
DrawCounts = Callable[[jax.Array, np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


def _clean_draws(draw_counts: DrawCounts, rng: jax.Array, x: np.ndarray, y: np.ndarray, lo: int,
                 hi: int, draws: int) -> draws_lib.Selection:
  """The rule's first candidate, the clean point, over `draws` draws (this process's points;
  the others' counts gathered, as every process decides which points go on alike)."""
  mine = np.arange(lo, hi)
  counts = np.zeros(len(y), np.int32)
  key = jax.random.fold_in(jax.random.fold_in(rng, draws_lib.STREAM), 0)
  counts[mine] = draw_counts(key, mine, x[mine], y, draws)
  counts = distributed.gather_points(counts[lo:hi], len(y))
  logging.info("autoattack: a randomised model: %d draws per candidate (%s)", draws,
               draws_lib.RULE)
  return draws_lib.Selection(x, counts, draws)


def _final_draws(draw_counts: DrawCounts, rng: jax.Array, selection: draws_lib.Selection,
                 y: np.ndarray, lo: int, hi: int, n: int, draws: int) -> dict[str, np.ndarray]:
  """Rule 3: the kept candidates over `draws` fresh draws; the per-point shares (gathered)."""
  mine = np.arange(lo, hi)
  key = jax.random.fold_in(jax.random.fold_in(rng, draws_lib.STREAM), 1)
  fresh = draw_counts(key, mine, selection.x_kept[mine], y, draws)
  fresh, kept, clean = distributed.gather_points(
      (fresh, selection.counts[lo:hi], selection.clean_counts[lo:hi]), n)
  return {"robust_rate": fresh / draws, "clean_rate": clean / draws,
          "selection_rate": kept / draws}


class AutoAttack:
  """Jitted, device-parallel AutoAttack of a model `apply_fn(variables, x, key) -> logits`.

  Images are float32 NHWC in [0, 1]. `attacks` is 'standard', 'rand', 'plus' or a list of
  registered components (component.py); 'rand' uses EOT over `eot_iter` (default 20) model
  draws per gradient, as the reference. `norm`: "Linf", "L2" or "L1" (with the reference's L1
  settings, L1_RESTARTS and L1_TARGET_CLASSES), which every attack must implement. `restarts`
  {name: n}: run that attack n times on the points still robust, with fresh randomness (a
  targeted one n times per target class), overriding the version's (RESTARTS); restart 0 draws
  what a run without restarts does. An attack's randomness does not depend on its place in the
  list (attack_key_id). `options` reaches components as `ctx.settings.options`. `draws`: K
  model draws per candidate for a randomised model (draws.py's rule; default draws.DRAWS when
  the probe finds the logits change between model keys, else 1, the reference's). What runs
  on the devices, and how points are chunked for them, is `self.device` (device_runs.py).
  """

  def __init__(self, apply_fn: ApplyFn, num_classes: int, eps: float,
               attacks: str | Sequence[str] = "standard", *, apgd_steps: int = 100,
               fab_steps: int = 100, square_queries: int = 5000,
               n_target_classes: int | None = None, eot_iter: int | None = None,
               batch_size: int = 500, devices: list | None = None, progress: bool = True,
               options: dict[str, Any] | None = None, norm: str = "Linf",
               restarts: Mapping[str, int] | None = None, draws: int | None = None):
    self.attacks = parse_attacks(attacks)
    self.draws = _checked_draws(draws)
    check_norm(self.attacks, norm, eps)
    self.restarts = check_restarts(self.attacks, restarts, norm)
    n_target_classes = _target_classes(n_target_classes, norm)
    _check_distinct_keys(self.attacks)
    _check_counts(apgd_steps=apgd_steps, fab_steps=fab_steps, square_queries=square_queries,
                  n_target_classes=n_target_classes)
    check_classes(self.attacks, num_classes)
    self.apply_fn, self.num_classes, self.eps = apply_fn, num_classes, float(eps)
    # The records are looked up once: a later registration does not change a built attack.
    self.components = {name: component.get(name) for name in self.attacks}
    self.n_targets = min(n_target_classes, num_classes - 1)
    rand = self.attacks == VERSIONS["rand"]
    self.version = version_of(self.attacks) or "standard"
    self.settings = component.Settings(
        apgd_steps=apgd_steps, fab_steps=fab_steps, square_queries=square_queries,
        eot_iter=eot_iter if eot_iter is not None else (20 if rand else 1),
        n_targets=self.n_targets, norm=norm, options=dict(options or {}))
    self.progress = progress
    self.device = device_runs.DeviceRuns(apply_fn, self.components, self.settings,
                                         devices or parallel.local_devices(), batch_size)

  def run(self, variables: Any, images: np.ndarray, labels: np.ndarray, seed: int = 0,
          pgd_acc: float | None = None) -> AutoAttackResult:
    """Attacks every point; `pgd_acc`, when given, is compared with the result (checks).

    A point counts as robust only if it is classified correctly without attack (`clean`).
    Non-finite weights, or non-finite logits on any point in the clean probe, raise
    checks.NonFiniteOutputError before any attack runs. In a multi-process run every process
    calls this with all the points and attacks its `distributed.point_range`; the per-point
    results are gathered, and every process returns the same result (each record's `seconds`
    is this process's own time, `process_seconds` everyone's)."""
    x, y = check_points(images, labels, self.num_classes)
    n = len(y)
    checks.check_finite_weights(variables)
    rng = jax.random.key(seed)
    lo, hi = distributed.point_range(n)
    mine = slice(lo, hi)
    clean, finite, zero, looks_like, difference, gap = self.device.probe_points(
        variables, x, y, lo, hi)
    checked = self.device.checked_points(n)
    randomised_model = bool(np.max(difference) > checks.RANDOM_TOL)
    warnings = [checks.randomised(difference[:checked], self.version),
                checks.probabilities(looks_like[:checked]), checks.zero_gradients(zero[:checked]),
                checks.batch_dependent(gap, randomised_model)]
    checks.check_finite_logits(finite)
    draws = self.draws or (draws_lib.DRAWS if randomised_model else 1)
    draw_counts = functools.partial(self.device.draw_counts, variables)
    selection = None
    if draws > 1:  # the clean pass of draws.py's rule replaces the single-draw verdict
      selection = _clean_draws(draw_counts, rng, x, y, lo, hi, draws)
      clean = selection.counts > 0
    robust, x_adv = clean.copy(), x.copy()  # robust only where correct without attack
    broken_by = np.full(n, -1)
    seconds = [self._attack_all(a, variables, rng, x, y, (lo, hi), (robust, x_adv, broken_by),
                                selection, draws) for a in range(len(self.attacks))]
    rates = {}
    if selection is not None:
      x_adv[mine] = selection.x_kept[mine]
      rates = _final_draws(draw_counts, rng, selection, y, lo, hi, n, draws)
    robust, x_adv, broken_by = distributed.gather_points(
        (robust[mine], x_adv[mine], broken_by[mine]), n)
    records = attack_records(self.attacks, clean, broken_by, seconds,
                             distributed.gather_values(np.asarray(seconds, np.float64)))
    warnings += [self._square_warning(broken_by),
                 checks.pgd_gap(pgd_acc, float(np.mean(rates.get("robust_rate", robust))))]
    warnings = [w for w in warnings if w]
    for w in warnings:
      logging.warning("autoattack: %s", w)
    return AutoAttackResult(clean, robust, x_adv, broken_by, self.attacks, records, warnings,
                            self.eps, self.settings.norm, draws, **rates)

  def _square_warning(self, broken_by: np.ndarray) -> str | None:
    """The reference's check: Square should break (almost) nothing the gradient-based attacks
    before it missed."""
    if "square" not in self.attacks:
      return None
    a = self.attacks.index("square")
    return checks.square_after_gradients(
        int(np.sum(broken_by == a)), broken_by.size,
        any(self.components[b].gradient_based for b in self.attacks[:a]))

  def _attack_all(self, a: int, variables: Any, rng: jax.Array, x: np.ndarray, y: np.ndarray,
                  bounds: tuple[int, int], verdicts: tuple[np.ndarray, np.ndarray, np.ndarray],
                  selection: Any, draws: int) -> float:
    """Runs attack number `a` on this process's points still robust, updating `verdicts`
    (robust, x_adv, broken_by) in place; its seconds. As the reference: every target class in
    turn, each run `restarts` times on what is left."""
    name, (lo, hi), n = self.attacks[a], bounds, len(y)
    robust, x_adv, broken_by = verdicts
    mine = slice(lo, hi)
    start, attacked = time.perf_counter(), int(robust[mine].sum())
    ranks = range(2, self.n_targets + 2) if self.components[name].targeted else [0]
    runs = self.restarts[name]
    for rank, restart in ((k, r) for k in ranks for r in range(runs)):
      todo = lo + np.flatnonzero(robust[mine])
      if not todo.size:
        break
      label = name if not rank else f"{name} {rank - 1}/{self.n_targets}"
      bar = points_bar(label if runs == 1 else f"{label} run {restart + 1}/{runs}", todo.size,
                       self.progress)
      pass_rng = _pass_rng(rng, name, rank, restart)
      attack = functools.partial(self.device.attack_points, variables, pass_rng, name, rank,
                                 restart, self.eps)
      for pos, (still, adv) in self.device.map(attack, todo,
                                               (x, y, np.arange(n, dtype=np.int32)), name):
        if selection is not None:  # a randomised model: draws.py's rule decides
          still = selection.offer(pos, adv, self.device.draw_counts(
              variables, jax.random.fold_in(pass_rng, draws_lib.STREAM), pos, adv, y, draws), a)
        hit = pos[~still]
        robust[hit], x_adv[hit], broken_by[hit] = False, adv[~still], a
        if bar is not None:
          bar.update(len(pos))
          bar.set_postfix(robust=int(robust[mine].sum()))
      if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    where = "" if jax.process_count() == 1 else (
        f" on process {jax.process_index()} (points {lo}..{hi - 1} of {n})")
    logging.info("autoattack %s: %d -> %d robust of %d%s (%.1f s)", name, attacked,
                 int(robust[mine].sum()), hi - lo, where, seconds)
    return seconds


def _checked_draws(draws: int | None) -> int | None:
  if draws is not None and draws < 1:
    raise ValueError(f"draws must be >= 1, got {draws}")
  return draws


def _check_counts(**counts: int) -> None:
  """ValueError unless every count (steps, queries, target classes) is an integer >= 1."""
  for name, v in counts.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def points_bar(name: str, total: int, show: bool = True):
  """A progress bar over `total` points (AutoAttack's attacks, the final PGD), or None: shown
  when asked, by process 0 only (on its own points) in a multi-process run."""
  if not show or total == 0 or not distributed.is_main():
    return None
  return tqdm(total=total, desc=name, unit="pt", dynamic_ncols=True, leave=False)
