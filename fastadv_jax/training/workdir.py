"""The files of a workdir besides checkpoints and metrics: config.json, results.json and the
evaluation outputs (written atomically), checked when read back; and what a checkpoint records
of the config it was written with (`written_with`), to explain one that does not fit."""
from __future__ import annotations

import json
import math
import os
import shlex
import stat
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
import fcntl
from fastadv_jax.configs import default
from fastadv_jax.runtime import plugins
from fastadv_jax.training import config_validation


def write_json(path: str, obj: Any) -> None:
  """Atomic: a reader (or a killed writer) never leaves a half-written file behind. Always
  valid JSON: a NaN or infinite float (which Python's json would write as the non-standard
  NaN / Infinity) is written as null."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_finite_or_null(obj), f, indent=2, sort_keys=True, allow_nan=False)
  os.replace(tmp, path)


def _finite_or_null(obj: Any) -> Any:
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite_or_null(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_null(v) for v in obj]
  return obj


def write_npz(path: str, arrays: dict[str, Any]) -> None:
  """Atomic, as write_json: named arrays in one uncompressed .npz (np.load reads it)."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
  os.replace(tmp, path)


def config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The run's config (None without config.json); fields added to the library since the run
  started take their defaults. WorkdirError if config.json cannot be read."""
  path = os.path.join(workdir, "config.json")
  if not os.path.lexists(path):
    return None
  stored = _load_json(path)
  try:
    return config_from_stored(stored)
  except (ValueError, TypeError, AttributeError) as e:
    raise WorkdirError(f"{path} cannot be read ({_why(e)})") from None


def _load_json(path: str, advice: str = "") -> Any:
  """The JSON in `path`; WorkdirError naming the file if it cannot be read or parsed."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"{path} cannot be read ({_why(e)}){advice}") from None


def config_from_stored(stored: dict) -> ml_collections.ConfigDict:
  """A stored config (config.json, or results.json's "config"), migrated
  (config_validation.migrate_stored_config) and laid over the library's defaults."""
  if not isinstance(stored, dict):
    raise ValueError("not a JSON object")
  stored = config_validation.migrate_stored_config(stored)
  stored = {k: v for k, v in stored.items() if k != PLUGIN_SOURCES}  # a record, not a field
  config = default.get_config()
  config.update(stored)
  return config


def _why(e: BaseException) -> str:
  """An OSError's reason, or the first line of another exception's message."""
  text = getattr(e, "strerror", None) or str(e).strip()
  return text.splitlines()[0][:200] if text else type(e).__name__


# Config fields a rerun may change, for an unfinished run (a resume) and a finished one alike
# (which recomputes nothing, so for it they change nothing at all). Each says where the data is,
# how the run is shown or how it is saved, never what it computes: no parameter, no row of
# metrics.jsonl and no number of results.json depends on it. Every other field is refused
# (RunChangedError), also those that only shape what is recorded along the way: log_every (the
# averaging windows of metrics.jsonl and results.json's final_train_metrics), eval_every,
# n_eval_points, eval_pgd_steps and eval_step_alpha (the diagnostic rows, and through them the
# early-stopped weights and results.json's "best"), co_* (the overfitting flag). With one of
# those changed halfway, the run's files would match neither config.
# eval_batch_size only sets how many points an evaluation hands the devices at once (a memory
# knob, like the device count, which a resume may change too): evaluation results are per point.
RESUME_SAFE_FIELDS = ("data_dir", "download", "plugins", "progress_bar", "checkpoint_every",
                      "keep_checkpoints", "eval_batch_size")
# Fields that only shape the final evaluation. An unfinished run may change them (its final
# evaluation is still to come; results.json records them). A finished run refuses them: its
# results.json is kept as it is, and `python -m fastadv_jax.evaluate` evaluates its weights
# with other settings (--n_eval, --attack, --pgd_steps, --pgd_restarts, --weights=best) into a
# file of its own (eval_*.json).
FINAL_EVALUATION_FIELDS = ("n_final_eval", "final_attack", "final_pgd_steps",
                           "final_pgd_restarts", "eval_early_stopped_model")


class WorkdirError(RuntimeError):
  """The workdir cannot be used: not a folder, not writable, or in use by another run."""


class RunChangedError(WorkdirError):
  """A rerun's config changes a field of the run recorded in the workdir that it may not."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists and other values are leaves."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(config: ml_collections.ConfigDict, recorded: ml_collections.ConfigDict
                   ) -> dict[str, tuple[Any, Any]]:
  """{field path: (recorded value, new value)} of the fields that differ, compared as written
  to JSON. Only what the library reads is compared: the top-level fields it declares, and the
  `method_args.<method>.<field>` and `model_args.<model>.<field>` of the two configs' method
  and model (other methods' and models' hyperparameters are never read). A field added to the
  library since the run was recorded holds its default in `recorded` (read_config), which is
  what the run trained with."""
  now, before = config_dict(config), config_dict(recorded)
  paths = [k for k in now if k not in ("method_args", "model_args")]
  for section, chosen in (("method_args", "method"), ("model_args", "model")):
    for name in dict.fromkeys((before.get(chosen), now.get(chosen))):
      for side in (now, before):
        paths += [f"{section}.{name}.{k}"
                  for k in ((side.get(section) or {}).get(name) or {})]
  flat_now, flat_before = _flatten(now), _flatten(before)
  return {p: (flat_before.get(p), flat_now.get(p)) for p in dict.fromkeys(paths)
          if flat_now.get(p) != flat_before.get(p)}


def _short(value: Any) -> str:
  text = json.dumps(value)
  return text if len(text) <= 40 else text[:37] + "..."


def check_rerun(config: ml_collections.ConfigDict, workdir: str, writes: bool = True
                ) -> dict | None:
  """What the run recorded in `workdir` lets this config do; reads only, before any work.

  - A config that differs from the recorded one (config.json as read_config reads it, else
    results.json's "config") in a field outside RESUME_SAFE_FIELDS and FINAL_EVALUATION_FIELDS:
    RunChangedError naming the fields, whether the run finished or not; except a run that
    neither finished nor saved a checkpoint (it failed or stopped before its first one): there
    is nothing to resume, and this config replaces it.
  - A finished run (results.json) is never rewritten: a changed FINAL_EVALUATION_FIELDS field
    is a RunChangedError pointing at `evaluate`; otherwise its recorded results are returned,
    and the caller computes nothing.
  - No run yet, or an unfinished one: None (train, or resume), once check_outputs found every
    file the run writes writable (with `writes`: False in the processes of a multi-process run
    other than 0, which write none of them).
  """
  if not os.path.isdir(workdir):
    return None  # nothing recorded; prepare() refuses a path that is not a folder
  for name in ("config.json", "results.json"):  # a folder there is no record, and no place
    _check_file_path(os.path.join(workdir, name))  # to write one either
  results = _read_results(workdir)
  recorded = read_config(workdir)
  if recorded is None and results is not None and isinstance(results.get("config"), dict):
    recorded = config_from_stored(results["config"])
  if recorded is not None:
    changed = config_changes(config, recorded)
    fixed = {p: v for p, v in changed.items()
             if p not in RESUME_SAFE_FIELDS and p not in FINAL_EVALUATION_FIELDS}
    if fixed and results is None and not has_checkpoint(workdir):
      # Nothing to resume (it failed, or was stopped, before its first checkpoint): the new
      # config replaces the recorded one, and the run starts from scratch.
      logging.info("%s holds no checkpoint of the run recorded there (%s); it is started with "
                   "this config instead", workdir, ", ".join(fixed))
    elif fixed:
      diffs = ", ".join(f"{p} {_short(a)} -> {_short(b)}" for p, (a, b) in fixed.items())
      raise RunChangedError(
          f"{workdir} holds a run recorded with another config ({diffs}); a recorded run "
          "cannot change how it trains or what it logs: rerun it with the values of its "
          "config.json, or use a new --workdir (docs/reliability.md lists the fields a rerun "
          "may change)")
    final = [p for p in changed if p in FINAL_EVALUATION_FIELDS]
    if results is not None and final:
      raise RunChangedError(
          f"{workdir} holds a finished run ({', '.join(final)} changed) and its results.json "
          "is kept as it is; to evaluate it with other settings, run python -m "
          f"fastadv_jax.evaluate --workdir={workdir} {_evaluate_flags(config)}, which writes "
          "an eval_*.json of its own")
  if results is not None:
    return results
  if writes:
    check_outputs(workdir)
  return None


def has_checkpoint(workdir: str) -> bool:
  """Whether the workdir holds a finished checkpoint (Orbax names those `<step>`; one being
  written has a temporary name), without opening Orbax."""
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


# The entry of a checkpoint's metadata that says what it was written with (written_with).
WRITTEN_WITH = "written_with"


def written_with(config: ml_collections.ConfigDict) -> dict:
  """Saved with every checkpoint, so that one that does not fit can be explained."""
  return {"config": config_dict(config), "devices": jax.device_count(),
          "processes": jax.process_count()}


def mismatch_cause(written: Any, config: ml_collections.ConfigDict) -> str:
  """Why a checkpoint written with `written` (its `written_with` record, or None for one
  saved before it was recorded) does not fit `config`, and what resumes it: the config fields
  that differ, or the device count; never advice that costs the checkpoint."""
  if not isinstance(written, dict) or not isinstance(written.get("config"), dict):
    return ("config.json (or the command) no longer describes the run that wrote it; was it "
            "edited? Resume with the values the run was started with, or train in a new "
            "--workdir")
  changed = {p: v for p, v in config_changes(config_from_stored(written["config"]),
                                             config).items()
             if p not in RESUME_SAFE_FIELDS and p not in FINAL_EVALUATION_FIELDS}
  if changed:
    fields = ", ".join(f"{p}={json.dumps(then)} (now {json.dumps(now)})"
                       for p, (now, then) in list(changed.items())[:4])
    flags = " ".join(f"--config.{p}={_flag_value(then)}" for p, (_, then) in changed.items())
    return (f"it was written with {fields}; restore those values in config.json and resume "
            f"with {flags}, or train in a new --workdir")
  now = (jax.device_count(), jax.process_count())
  then = (written.get("devices"), written.get("processes"))
  if then != now:
    return (f"it was written on {then[0]} device(s) in {then[1]} process(es), this run has "
            f"{now[0]} in {now[1]}: resume it with {then[0]} device(s) (e.g. "
            f"JAX_NUM_CPU_DEVICES={then[0]} on CPU)")
  return "it was written with this config; it may come from another version of fastadv_jax"


def _flag_value(value: Any) -> str:
  """`value` as a shell word for --config.<field>=... (strings bare, sequences as tuples)."""
  if isinstance(value, (list, tuple)):
    value = "(" + ",".join(str(v) for v in value) + (",)" if len(value) == 1 else ")")
  elif not isinstance(value, str):
    value = json.dumps(value)
  return shlex.quote(value)


def _evaluate_flags(config: ml_collections.ConfigDict) -> str:
  """evaluate's flags for the final evaluation that `config` asks for."""
  flags = [f"--n_eval={config.n_final_eval}", f"--attack={config.final_attack}",
           f"--pgd_steps={config.final_pgd_steps}",
           f"--pgd_restarts={config.final_pgd_restarts}"]
  if config.selection == "validation":
    flags.append("(and --weights=selected for the validation-selected weights)")
  elif config.eval_early_stopped_model:
    flags.append("(and --weights=best for the early-stopped weights)")
  if float(config.ema_decay) > 0:
    flags.append("(and --weights=averaged for the weight average)")
  return " ".join(flags)


def _read_results(workdir: str) -> dict | None:
  """The recorded results.json; None if there is none."""
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    return None
  return read_results(path)


def read_results(path: str) -> dict:
  """A results.json, checked (check_results) before any of its numbers is used."""
  results = _load_json(path, "; move it away to redo the final evaluation")
  if not isinstance(results, dict):
    raise WorkdirError(f"{path} holds no results; move it away to redo the final evaluation")
  check_results(results, path)
  return results


# (robust, clean) accuracies of one pass over the same points, where robust can never exceed
# clean (a point counts as robust only if it is also classified correctly unperturbed). Not so
# for a randomised model's AutoAttack accuracy (`autoattack_draws`): a mean over fresh draws,
# which may exceed the clean draws' on never-broken points.
_ROBUST_OF_CLEAN = (("pgd_acc", "clean_acc"), ("autoattack_acc", "autoattack_clean_acc"))


def check_results(results: dict, path: str) -> None:
  """WorkdirError unless every accuracy this library wrote into `results` could have been
  written by it: each `*_acc` a finite number in [0, 1], and in an evaluation record (the top
  level, or any record with `n_eval`) robust <= clean. A number that fails was changed outside
  the tool, and is never printed or reused."""
  def bad(why: str) -> WorkdirError:
    return WorkdirError(f"{path} was changed outside fastadv_jax ({why}); its numbers are not "
                        "used: restore it, or move it away to redo the final evaluation")

  def walk(record: dict, prefix: str, evaluation: bool) -> None:
    for key, value in record.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.", "n_eval" in value)
      elif key.endswith("_acc") and not (
          isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise bad(f"{prefix}{key} {value!r} is not an accuracy in [0, 1]")
    if evaluation:
      for robust, clean in _ROBUST_OF_CLEAN:
        if robust.startswith("autoattack") and "autoattack_draws" in record:
          continue
        if robust in record and clean in record and record[robust] > record[clean]:
          raise bad(f"{prefix}{robust} {record[robust]} is above {prefix}{clean} "
                    f"{record[clean]}")

  walk(results, "", True)


# What a training run writes in its workdir: files (each first written as `<name>.tmp`) and
# folders. check_outputs looks at each before the first step.
OUTPUT_FILES = ("config.json", "results.json", "metrics.jsonl")
OUTPUT_FOLDERS = ("checkpoints", "checksums", "corrupt_checkpoints", "tensorboard")


def check_outputs(workdir: str) -> None:
  """WorkdirError naming the first path the run could not write, found now rather than when it
  is written (results.json: after all of training): a file's path taken by a folder or the
  reverse, or a file that exists read-only (its mode, or the immutable attribute, which also
  stops root)."""
  for name in OUTPUT_FILES + tuple(n + ".tmp" for n in OUTPUT_FILES):
    path = os.path.join(workdir, name)
    _check_file_path(path)
    if os.path.isfile(path) and not os.access(path, os.W_OK):
      raise WorkdirError(f"{path} is read-only; the run writes it: make it writable, or use a "
                         "new --workdir")
  for name in OUTPUT_FOLDERS:
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and not os.path.isdir(path):
      raise WorkdirError(f"{path} exists and is not a folder; the run writes a folder there: "
                         "move it away")


def _check_file_path(path: str) -> None:
  """WorkdirError if `path` exists and is not a file (nor a link to one); one look, so a writer
  that replaces the file meanwhile (os.replace) is no false alarm."""
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    return
  if not stat.S_ISREG(mode):
    raise WorkdirError(f"{path} exists and is not a file; the run writes a file there: move it "
                       "away")


# config.json's record of where the run's plugins came from (plugins.sources): beside the
# config's fields, not one of them; written only when the run imported a plugin.
PLUGIN_SOURCES = "plugin_sources"


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json, unless it holds this config already (a resume with the same command
  rewrites nothing). Training checks with check_rerun first that a resume changes only
  RESUME_SAFE_FIELDS and FINAL_EVALUATION_FIELDS; their new values are recorded (so `evaluate`
  reads the data where it is now)."""
  path = os.path.join(workdir, "config.json")
  now = config_dict(config)
  sources = plugins.sources(config.plugins)
  before = read_config(workdir)
  if before is not None:
    if config_dict(before) == now and _load_json(path).get(PLUGIN_SOURCES, {}) == sources:
      return
    changed = config_changes(config, before)
    unsafe = [p for p in changed if p not in RESUME_SAFE_FIELDS
              and p not in FINAL_EVALUATION_FIELDS]
    if changed:  # `unsafe`: a run that saved no checkpoint, or torch_import's new workdir
      (logging.warning if unsafe and has_checkpoint(workdir) else logging.info)(
          "Recording the new values of %s in %s", ", ".join(changed), path)
  write_json(path, {**now, PLUGIN_SOURCES: sources} if sources else now)


def prepare(workdir: str) -> None:
  """Creates the workdir if needed and checks that it is a writable folder, before any work."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} exists and is not a folder")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create workdir {workdir}: {e.strerror}") from None
  check_writable(workdir)


def check_writable(workdir: str) -> None:
  probe = os.path.join(workdir, f".write_test.{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror})") from None


class Lock:
  """An exclusive lock on a workdir for one run: `<workdir>/.lock`, held with flock(2) and
  holding the owner's process id. The kernel drops a flock when its process dies, however it
  dies, so a crashed run never leaves a lock that blocks the next one."""

  def __init__(self, workdir: str, enabled: bool = True):
    """`enabled=False`: a no-op (the processes other than 0 of a multi-process run)."""
    self.path = os.path.join(workdir, ".lock")
    self.file = None
    self.enabled = enabled

  def __enter__(self) -> "Lock":
    if not self.enabled:
      return self
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      owner = f.read().strip() or "unknown"
      f.close()
      raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by another run "
                         f"(process {owner}); wait for it to finish or use another --workdir"
                         ) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    self.file = f
    return self

  def __exit__(self, *exc) -> None:
    if self.file is not None:
      self.file.close()  # releases the flock
      self.file = None
