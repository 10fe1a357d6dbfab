"""Up-front config checks, so a bad run fails in one line naming the field, not mid-training."""
from __future__ import annotations

import dataclasses
import math

import ml_collections
from absl import logging
from fastadv_jax import autoattack, methods, models, registry
from fastadv_jax.data import datasets
from fastadv_jax.runtime import plugins
from fastadv_jax.training import evaluation, model_config

INITS = ("", "zero", "uniform", "corner")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cyclic", "piecewise", "constant", "onecycle")
SCHEDULE_UNITS = ("iteration", "epoch")
PARALLELISM = ("pmap", "shard_map")  # engines.ENGINES (not imported: this module stays light)
SELECTIONS = ("early_stopping", "validation")


class ConfigError(ValueError):
  """A config field has a value the library cannot run with."""


# Method hyperparameters that were top-level config fields before they moved to the methods
# (config.method_args.<method>.<field>): for each built-in method, old name -> its field now.
_FGSM = {"fgsm_alpha": "alpha"}
_GUIDED = {**_FGSM, "guided_init": "init"}
_MOVED_FIELDS = {
    "fgsm": _FGSM, "fgsm_rs": _FGSM, "random_corner": _FGSM,
    "free": {"free_replay": "replay", "free_alpha": "alpha"},
    "pgd": {"pgd_steps": "steps", "pgd_alpha": "alpha"},
    "pgd_corner": {"pgd_steps": "steps", "pgd_alpha": "alpha"},
    "nfgsm": {"nfgsm_noise": "noise", "nfgsm_step": "step", "nfgsm_clip": "clip"},
    "zerograd": {**_FGSM, "zerograd_quantile": "quantile"},
    "multigrad": {**_FGSM, "multigrad_samples": "samples"},
    "elle": {**_FGSM, "elle_lambda": "lam"},
    "elle_a": {**_FGSM, "elle_lambda_aux": "lam_aux", "elle_decay": "decay",
               "elle_sensitivity": "sensitivity"},
    "gat": {**_GUIDED, "gat_lambda": "lam"},
    "nuat": {**_GUIDED, "nuat_lambda_max": "lam_max", "nuat_ramp": "ramp"},
}
MOVED_FIELDS = {old: new for table in _MOVED_FIELDS.values() for old, new in table.items()}
# Model sizes that were top-level config fields before models owned their hyperparameters
# (config.model_args.<model>.<field>): for each built-in model, old name -> its field now.
_MOVED_MODEL_FIELDS = {
    "cnn": {"n_filters": "n_filters", "n_layers": "n_layers"},
    "small_cnn": {"n_filters": "n_filters", "use_batch_norm": "use_batch_norm"},
    "preact_resnet18": {"resnet_widths": "stage_widths"},
    "wide_resnet": {"wrn_depth": "depth", "wrn_widen": "widen"},
}
MOVED_MODEL_FIELDS = {old: (model, new) for model, table in _MOVED_MODEL_FIELDS.items()
                      for old, new in table.items()}


def moved_field_hint(name: str) -> str:
  """'' or where a former top-level method or model field lives now."""
  if name in MOVED_FIELDS:
    return f"; method hyperparameters are config.method_args.<method>.{MOVED_FIELDS[name]} now"
  if name in MOVED_MODEL_FIELDS:
    models_using = [m for m, table in _MOVED_MODEL_FIELDS.items() if name in table]
    return ("; model hyperparameters are config.model_args.<model>.<field> now: "
            + ", ".join(f"model_args.{m}.{_MOVED_MODEL_FIELDS[m][name]}" for m in models_using))
  return ""


def migrate_stored_config(stored: dict) -> dict:
  """A config.json written before method or model hyperparameters moved: the fields its method
  and model read become `method_args.<method>.<field>` and `model_args.<model>.<field>`; the
  other former fields are dropped. One INFO line says what was read where."""
  if "method_args" in stored and "model_args" in stored:
    return stored
  migrated = dict(stored)
  if "method_args" not in stored:
    table = _MOVED_FIELDS.get(stored.get("method"), {})
    own = {new: stored[old] for old, new in table.items() if old in stored}
    migrated = {k: v for k, v in migrated.items() if k not in MOVED_FIELDS}
    migrated["method_args"] = {stored["method"]: own} if table else {}
  if "model_args" not in stored:
    table = _MOVED_MODEL_FIELDS.get(stored.get("model"), {})
    own = {new: stored[old] for old, new in table.items() if old in stored}
    migrated = {k: v for k, v in migrated.items() if k not in MOVED_MODEL_FIELDS}
    migrated["model_args"] = {stored["model"]: own} if own else {}
    if own:
      logging.info("config.json was written before model_args: read %s", ", ".join(
          f"{old} as model_args.{stored['model']}.{new}" for old, new in table.items()
          if old in stored))
  return migrated


def _check(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}: {msg}")


def _check_normalization(c: ml_collections.ConfigDict) -> None:
  """input_mean / input_std: both empty, or one value per image channel, std > 0."""
  mean, std = tuple(c.input_mean), tuple(c.input_std)
  if not mean and not std:
    return
  channels = datasets.IMAGE_SHAPES[c.dataset][2]
  for field, values in (("input_mean", mean), ("input_std", std)):
    _check(all(isinstance(v, (int, float)) and math.isfinite(v) for v in values), field,
           f"must be finite numbers, got {values}")
    _check(len(values) == channels, field,
           f"needs one value per channel of {c.dataset} ({channels}), got {len(values)}: {values}")
  _check(min(std) > 0, "input_std", f"must be > 0 (it divides the input), got {std}")


def _check_finite(c: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Every float field is a number: NaN passes no comparison with a bound, so an unchecked
  NaN (or an infinite lambda) would train silently to NaN."""
  for name, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, f"{prefix}{name}.")
    elif isinstance(value, float):
      _check(math.isfinite(value), prefix + name, f"must be a finite number, got {value}")


def _check_other_method_args(c: ml_collections.ConfigDict, methods) -> None:
  """A hyperparameter set for a method the run does not train may be a forgotten
  --config.method (e.g. nfgsm's noise set, FGSM trained): one warning naming both. Not a
  refusal: a sweep over methods passes one method's hyperparameters to all its runs
  (experiments/sweep.py --extra), and a recorded run must still resume. An invalid value is
  refused all the same."""
  for name in c.method_args:
    if name == c.method or name not in methods.names():
      continue
    method = methods.get(name)
    try:
      mine = dataclasses.asdict(method.args_from(c))
    except methods.ArgError as e:
      raise ConfigError(f"config.method_args.{name}.{e.field}: {e.message}") from None
    default = dataclasses.asdict(method.default_args())
    for field in [k for k in mine if mine[k] != default[k]][:1]:
      logging.warning(
          "config.method_args.%s.%s is set to %r, but config.method is %r, which does not read "
          "it (add --config.method=%s if %s was meant)", name, field, mine[field], c.method,
          name, name)


def _check_components(c: ml_collections.ConfigDict) -> None:
  """The plugins import, and the data set, model and method are registered names whose args
  sections their own records accept."""
  try:
    plugins.load(c.plugins)
  except plugins.PluginError as e:
    raise ConfigError(f"config.plugins: {e}") from None
  _check(c.dataset in datasets.DATASETS, "dataset",
         f"unknown dataset {c.dataset!r}; choose from {tuple(datasets.DATASETS)}")
  _check(c.model in models.names(), "model", f"unknown model {c.model!r}; choose from {models.names()}")
  _check(c.method in methods.names(), "method",
         f"unknown method {c.method!r}; choose from {methods.names()}")
  try:
    methods.get(c.method).args_from(c)
  except methods.ArgError as e:
    raise ConfigError(f"config.method_args.{c.method}.{e.field}: {e.message}") from None
  _check_other_method_args(c, methods)
  try:
    model_config.model_args(c)
  except registry.ArgError as e:
    raise ConfigError(f"config.model_args.{c.model}.{e.field}: {e.message}") from None


def validate_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Raises ConfigError naming the first offending field. Imports `config.plugins` first, so
  the registries it reads hold what the run's plugins register."""

  c = config
  _check_components(c)
  _check_finite(c)
  _check(c.attack_init in INITS, "attack_init", f"unknown init {c.attack_init!r}; choose from {INITS}")
  _check(c.optimizer in OPTIMIZERS, "optimizer", f"unknown optimizer {c.optimizer!r}; choose from {OPTIMIZERS}")
  _check(c.lr_schedule in LR_SCHEDULES, "lr_schedule",
         f"unknown schedule {c.lr_schedule!r}; choose from {LR_SCHEDULES}")
  _check(c.schedule_unit in SCHEDULE_UNITS, "schedule_unit",
         f"unknown unit {c.schedule_unit!r}; choose from {SCHEDULE_UNITS}")
  _check(c.parallelism in PARALLELISM, "parallelism",
         f"unknown engine {c.parallelism!r}; choose from {PARALLELISM}")
  _check(0.0 <= c.eps <= 1.0, "eps", f"must be in [0, 1] (pixel units, e.g. 8/255), got {c.eps}")
  _check(c.seed >= 0, "seed", f"must be >= 0, got {c.seed}")
  _check(c.num_epochs >= 1, "num_epochs", f"must be >= 1, got {c.num_epochs}")
  _check(c.batch_size >= 1, "batch_size", f"must be >= 1, got {c.batch_size}")
  _check(c.batch_size % num_devices == 0, "batch_size",
         f"{c.batch_size} is not divisible by the {num_devices} devices")
  _check(c.lr_max > 0, "lr_max", f"must be > 0, got {c.lr_max}")
  _check(c.weight_decay >= 0, "weight_decay", f"must be >= 0, got {c.weight_decay}")
  _check(c.eps_warmup_epochs >= 0, "eps_warmup_epochs", f"must be >= 0, got {c.eps_warmup_epochs}")
  _check(c.eps_warmup_epochs <= c.num_epochs, "eps_warmup_epochs",
         f"a {c.eps_warmup_epochs}-epoch ramp is longer than the {c.num_epochs}-epoch run: eps "
         f"would never reach {c.eps}; set it <= config.num_epochs")
  _check(0.0 <= c.momentum < 1.0, "momentum",
         f"must be in [0, 1) (SGD diverges at >= 1; the paper's 0.9), got {c.momentum}")
  _check(c.grad_align_lambda >= 0, "grad_align_lambda", f"must be >= 0, got {c.grad_align_lambda}")
  _check_normalization(c)
  _check(c.grad_align_derivative in ("auto", "double_backprop", "jvp"), "grad_align_derivative",
         f"must be auto, double_backprop or jvp, got {c.grad_align_derivative!r}")
  _check(not (c.grad_align_derivative == "jvp" and c.grad_align_backprop_g1),
         "grad_align_derivative", "jvp does not differentiate through g1 "
         "(grad_align_backprop_g1=True needs double_backprop)")
  _check(0.0 <= c.label_smoothing < 1.0, "label_smoothing",
         f"must be in [0, 1), got {c.label_smoothing}")
  _check(0.0 <= c.ema_decay < 1.0, "ema_decay",
         f"must be in [0, 1) (0 = no weight averaging; the benchmark's 0.9995), got {c.ema_decay}")
  _check(c.validation_size >= 0, "validation_size",
         f"must be >= 0 (0 = no validation split), got {c.validation_size}")
  _check(c.selection in SELECTIONS, "selection",
         f"unknown selection {c.selection!r}; choose from {SELECTIONS}")
  _check(c.selection != "validation" or c.validation_size > 0, "selection",
         "'validation' selects on the validation split: set config.validation_size > 0 "
         "(the benchmark's 1000)")
  _check(c.eval_step_alpha > 0, "eval_step_alpha", f"must be > 0, got {c.eval_step_alpha}")
  _check(c.crop_padding >= 0, "crop_padding", f"must be >= 0, got {c.crop_padding}")
  for field in ("log_every", "eval_every", "checkpoint_every", "n_eval_points", "eval_pgd_steps",
                "final_pgd_steps", "final_pgd_restarts", "eval_batch_size", "keep_checkpoints"):
    _check(c[field] >= 1, field, f"must be >= 1, got {c[field]}")
  for field in ("co_pgd_drop", "co_min_best_pgd", "co_alignment_drop", "co_fgsm_pgd_gap"):
    _check(0.0 <= c[field] <= 1.0, field,
           f"must be in [0, 1] (a fraction of an accuracy or alignment), got {c[field]}")
  _check_final_attack(c)


def _check_final_attack(c: ml_collections.ConfigDict) -> None:
  """What the final evaluation would refuse after all of training, refused now."""
  _check(c.n_final_eval == -1 or c.n_final_eval >= 1, "n_final_eval",
         f"must be -1 (all) or >= 1, got {c.n_final_eval}")
  try:
    _, aa_attacks = evaluation.parse_attack_spec(c.final_attack)
    if aa_attacks:
      autoattack.check_classes(aa_attacks, datasets.NUM_CLASSES[c.dataset])
  except ValueError as e:
    raise ConfigError(f"config.final_attack: {e}") from None
  _check(not aa_attacks or c.eps > 0, "final_attack",
         f"{c.final_attack!r} runs AutoAttack, which needs config.eps > 0, got {c.eps}")
