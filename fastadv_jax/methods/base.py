"""What a training method is: one record that the step, configs, validation, sweeps and
benchmark all read (see methods/__init__.py for the registry).

A method supplies the inner maximisation (`perturb`) and may add a regulariser on top of the
cross-entropy, carry a per-example perturbation from one step to the next (Free-AT), replay
each minibatch, keep run-level state (ELLE-A's adaptive lambda, a universal perturbation), keep
state for every training example across epochs (FGSM-PGI's perturbation and momentum buffers),
replace the cross-entropy (LIET's random label smoothing) or the point it is taken at
(FGSM-PCO's mixture). GradAlign is not a method but a regulariser that goes on top of any of
them (`config.grad_align_lambda`).

Per-example state: `Method.example_state(args, input_shape)` declares one row (a dict of
`jax.ShapeDtypeStruct`); the train state holds a row for every training example, indexed by its
position in the training set and spread over the devices (parallel.py), all zeros at the start
(a method that needs another start keeps a flag in the row). Each step the method sees the rows
of its batch (`AttackInputs.example_rows`) and returns the new ones (`Perturbation.example_rows`).

A method's hyperparameters are a frozen dataclass owned by its module (`Method.args`), whose
defaults are the published values and whose `__post_init__` refuses values it cannot run with
(`check`). The method sees only that record, never the project config, so its functions can be
called from any training loop (`methods.perturb`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax

from fastadv_jax import attacks, registry
from fastadv_jax.registry import ArgError, NoArgs, check  # noqa: F401  (the methods' API)

Forward = Callable[[Any, jax.Array], tuple[jax.Array, Any]]  # (params, x) -> (logits, stats)


class AttackInputs(NamedTuple):
  """What a training perturbation sees (all per-device arrays)."""
  args: Any                        # the method's hyperparameters (its `Method.args` record)
  loss_fn: attacks.LossFn          # per-example CE at the current weights
  logits_fn: Callable[[jax.Array], jax.Array]  # logits at the current weights
  x: jax.Array                     # augmented batch in [0, 1]
  y: jax.Array
  keys: jax.Array                  # per-example attack keys
  eps: jax.Array                   # this iteration's eps (after any warm-up)
  carried: jax.Array | None        # the carried perturbation (Free-AT), else None
  init: str                        # the start: config.attack_init, else the method's default
  step: jax.Array                  # the iteration (0-based), e.g. for alternating attack terms
  progress: jax.Array              # fraction of training done after this step, in (0, 1]
  axis_name: str | None            # the device axis, for terms that couple examples (NuAT)
  state: Any = None                # run-level method state (replicated), or None
  example_rows: Any = None         # this batch's rows of the per-example state, or None
  epoch: jax.Array | int = 0       # the epoch (0-based) of this step, for buffer resets
  # Logits with BatchNorm in eval mode (running statistics, not updated), for attacks run as
  # the evaluation sees the model (PGD-AT as the benchmark runs it, TRADES, LIET's starts).
  eval_logits_fn: Callable[[jax.Array], jax.Array] | None = None
  # x -> (penultimate features, logits) in train mode, for methods that look inside (FUAP).
  features_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None
  label_smoothing: float = 0.0     # the training cross-entropy's (loss_fn has the attack's)
  # One key for the whole (global) batch, the same on every device: for choices drawn once per
  # batch (LIET's masking rate), and for initialising run-level state at step 0.
  batch_key: jax.Array | None = None


class ModelInfo(NamedTuple):
  """What `Method.init_state_for` may size run-level state by."""
  input_shape: tuple[int, ...]     # one example, (H, W, C)
  num_classes: int
  feature_dim: int                 # the penultimate features' width (models.penultimate_features)


class Perturbation(NamedTuple):
  delta: jax.Array                 # under stop_gradient
  clean_grad: jax.Array | None = None  # input gradient at x, if computed anyway (GradAlign g1)
  state: Any = None                # the next run-level state (None: unchanged)
  example_rows: Any = None         # the batch's next per-example rows (None: unchanged)
  aux: Any = None                  # what the regulariser needs from the attack (e.g. its start)


class Passes(NamedTuple):
  """The network passes one training step of a method needs, counted in passes over the step's
  batch (ELLE's 3B batch is 3): what its algorithm costs, whatever the code around it does.
  The benchmark times each kind on the model and compares a step with its sum
  (training/pass_costs.py; `benchmark --passes`)."""
  forward: float = 0.0       # forward only, no gradient (clean logits for an attack's target)
  input_grad: float = 0.0    # forward + backward to the input (one attack step)
  weight_grad: float = 0.0   # forward + backward to the weights (a point of the training loss)
  second_order: float = 0.0  # an input gradient differentiated with respect to the weights


ONE_STEP = Passes(input_grad=1, weight_grad=1)  # an attack step, then the training loss


class MethodOutputError(TypeError):
  """A method's function returned something the step cannot use (found when it is traced)."""


def checked_perturbation(method: "Method", out: Any, x: jax.Array) -> Perturbation:
  """`out` of `method.perturb` for the batch `x`, once it is a Perturbation whose delta has
  x's shape and a floating dtype; otherwise a one-line MethodOutputError naming the method
  and the module that defines it (shapes are static: this runs at trace time, before work)."""
  where = f"method {method.name!r} ({getattr(method.perturb, '__module__', '?')}.perturb)"
  if not isinstance(out, Perturbation):
    what = (f"an array of shape {tuple(out.shape)}" if hasattr(out, "shape")
            else type(out).__name__)
    raise MethodOutputError(f"{where} returned {what}, not a methods.base.Perturbation")
  shape = getattr(out.delta, "shape", None)
  if shape is None or tuple(shape) != tuple(x.shape):
    raise MethodOutputError(f"{where} returned a delta of shape {shape} for a batch of shape "
                            f"{tuple(x.shape)}; it must have the batch's shape")
  if not jax.numpy.issubdtype(out.delta.dtype, jax.numpy.floating):
    raise MethodOutputError(f"{where} returned a delta of dtype {out.delta.dtype}; it must be "
                            "a float array")
  return out


class RegularizerInputs(NamedTuple):
  """What a method's regulariser sees inside the differentiated loss."""
  args: Any                        # the method's hyperparameters
  forward: Forward
  params: Any
  x: jax.Array
  y: jax.Array
  delta: jax.Array
  logits: jax.Array                # logits at the point the cross-entropy is taken
  keys: jax.Array                  # per-example keys for the regulariser's own noise
  eps: jax.Array
  state: Any                       # run-level method state (replicated), or None
  progress: jax.Array              # fraction of training done after this step, in (0, 1]
  axis_name: str | None
  aux: Any = None                  # Perturbation.aux
  ce_aux: Any = None               # the second output of a callable `Method.ce_at`
  epoch: jax.Array | int = 0       # the epoch (0-based) of this step


class CELossInputs(NamedTuple):
  """What a method's own training cross-entropy (`Method.train_ce`) sees."""
  args: Any
  logits: jax.Array                # at the point the cross-entropy is taken
  y: jax.Array
  keys: jax.Array                  # per-example keys for its own randomness
  label_smoothing: float           # config.label_smoothing


class RegularizerOutput(NamedTuple):
  local: jax.Array                 # this device's share (pmean of its gradient = global grad)
  value: jax.Array                 # the global regulariser value, for logging
  state: Any = None                # the next run-level method state


@dataclasses.dataclass(frozen=True)
class Method:
  """One training method. Only `name`, `summary` and `perturb` are required."""
  name: str
  summary: str                     # one line for the docs' method table and --help
  perturb: Callable[[AttackInputs], Perturbation]
  # Its hyperparameters: a frozen dataclass whose defaults are the published values. They are
  # the config fields `method_args.<name>.<field>` (`--config.method_args.nfgsm.noise=3`).
  args: type = NoArgs
  # The start when config.attack_init is "" (zero | uniform | corner), for methods whose start
  # is configurable (FGSM family, PGD, ZeroGrad, ELLE); the others fix their own start.
  default_init: str = "zero"
  # Where the cross-entropy is taken: "adversarial" (x + delta), "clean" (x; GAT, NuAT), or a
  # function of the weights (FGSM-PCO's mixture): RegularizerInputs (logits None) ->
  # (training input, aux passed on as RegularizerInputs.ce_aux), differentiated through.
  ce_at: str | Callable[[RegularizerInputs], tuple[jax.Array, Any]] = "adversarial"
  # The training cross-entropy, per example (default: CE with config.label_smoothing):
  # CELossInputs -> (B,). LIET's random-weight smoothing; FGSM-PCO's soft targets.
  train_ce: Callable[[CELossInputs], jax.Array] | None = None
  regularizer: Callable[[RegularizerInputs], RegularizerOutput] | None = None
  # Per-example perturbation carried across steps (Free-AT): the next one from the update's
  # own gradient with respect to delta: (args, delta, grad_delta, x, eps) -> carried.
  next_carried: Callable[..., jax.Array] | None = None
  # How many consecutive optimiser steps see the same minibatch (Free-AT's m): args -> int.
  replays: Callable[[Any], int] = lambda args: 1
  # Run-level state (replicated over devices), e.g. ELLE-A's lambda: args -> pytree. With
  # `init_state_for`, (args, ModelInfo) -> pytree instead (a universal perturbation's shape, an
  # auxiliary head's width); give one of the two. State that starts random is drawn at step 0
  # from `AttackInputs.batch_key`.
  init_state: Callable[[Any], Any] | None = None
  init_state_for: Callable[[Any, ModelInfo], Any] | None = None
  # One row of per-example state: (args, input_shape) -> {name: jax.ShapeDtypeStruct}.
  example_state: Callable[[Any, tuple[int, ...]], Mapping[str, Any]] | None = None
  # Hyperparameters derived from other config fields (e.g. a lambda that depends on eps),
  # computed after all overrides by the config files (configs/common.finish), unless an
  # override set them: config -> {args field: value}.
  derived: Callable[[Any], Mapping[str, Any]] = lambda config: {}
  # Paper names that select this method, with the hyperparameters each sets.
  presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  # The passes one step needs by the algorithm (the benchmark's yardstick): args -> Passes;
  # None for a method that does not say (the benchmark then prints no expected cost).
  passes: Callable[[Any], Passes] | None = None

  def __post_init__(self):
    if not registry.is_args_type(self.args):
      raise TypeError(f"method {self.name!r}: `args` must be a dataclass type, got {self.args!r}")
    fields = set(self.arg_names)
    for preset, values in self.presets.items():
      unknown = sorted(set(values) - fields)
      if unknown:
        raise TypeError(f"method {self.name!r}: preset {preset!r} sets {unknown}, which are not "
                        f"fields of {self.args.__name__} {sorted(fields)}")

  @property
  def carries_delta(self) -> bool:
    return self.next_carried is not None

  @property
  def has_state(self) -> bool:
    return self.init_state is not None or self.init_state_for is not None

  def initial_state(self, args: Any, info: ModelInfo) -> Any:
    """The run-level state before the first step (None for a method without)."""
    if self.init_state_for is not None:
      return self.init_state_for(args, info)
    return self.init_state(args) if self.init_state is not None else None

  @property
  def arg_names(self) -> tuple[str, ...]:
    return registry.arg_names(self.args)

  def init_kind(self, config: Any) -> str:
    """The start of the perturbation: config.attack_init, or this method's default if ""."""
    return config.attack_init or self.default_init

  def default_args(self) -> Any:
    return self.args()

  def make_args(self, values: Mapping[str, Any] | None = None) -> Any:
    """The args record from a mapping of field values (missing fields take their defaults),
    each converted to the field's declared type; ArgError names a bad or unknown field."""
    return registry.make_args(self.args, values, self.name)

  def args_from(self, config: Any) -> Any:
    """This method's args record from `config.method_args.<name>` (defaults where absent)."""
    all_args = config.get("method_args", None) if hasattr(config, "get") else None
    mine = all_args.get(self.name, None) if all_args is not None else None
    return registry.args_from_section(self.make_args, mine)
