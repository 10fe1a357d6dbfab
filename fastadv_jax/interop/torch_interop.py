"""Models to and from PyTorch state_dicts, in the layout of the original code (torch_models.py).

Which layers a model has in PyTorch is part of its record (models.ModelSpec.torch, a
models.TorchLayout: the state_dict entries and the constructor arguments); a model without one
(torch=None, e.g. resnet18) cannot be converted, and says so. This module only converts.

The conversions are plain numpy, so exporting needs no PyTorch; writing or reading a `.pt` file
does (`pip install fastadv_jax[torch]`), a `.npz` of the same arrays does not. What changes
between the frameworks:
  - conv kernels: Flax HWIO (kh, kw, in, out) <-> PyTorch OIHW (out, in, kh, kw);
  - dense kernels: (in, out) <-> (out, in); after a flatten, Flax flattens NHWC in (h, w, c)
    order and PyTorch NCHW in (c, h, w) order, so the input axis is permuted as well;
  - BatchNorm: scale/bias/mean/var <-> weight/bias/running_mean/running_var, eps 1e-5 in both
    (models.py); PyTorch's `num_batches_tracked` is written as 0 and ignored on import;
  - biases: the ResNets' convs have none in either layout.
Input normalisation (config.input_mean / input_std, models.InputNormalization) is no layer of
any layout: it is the buffers `mu` and `sigma`, shape (1, C, 1, 1), at the top of the state_dict
(the names RobustBench's models use), and `mean` / `std` in spec.json's kwargs, for every model.
Export writes them when the config normalises and not otherwise. Import checks them where a
state_dict has them: they must equal the config's values (mean 0 and std 1 when the config has
none), else a one-line error naming the key, since a model fed inputs normalised otherwise than it
was trained with is wrong without any error. A state_dict without them (TRADES' checkpoints, whose
normalisation is in the evaluation code) imports under any config.

Import is strict, because a network filled in part is evaluated as another network without any
error: every parameter must be filled, and every key of the state_dict must be read, except
PyTorch's `num_batches_tracked` counters, the normalisation buffers (checked as above) and a
layout's `unused_prefixes` (the `sub_block1` of RobustBench's WideResNets, which their forward
pass never reads); a DataParallel `module.` prefix is dropped. A missing or unused key, a shape
that does not fit, a tensor that is not real floating point (bool, integer, complex, strings), a
NaN/Inf value (also one that overflows float32) or a BatchNorm running_var below zero (which makes
every logit NaN) is an error naming the tensor, and, for the models whose layout can read it off
the file (models.TorchLayout.fields), the architecture the file holds against the config's.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from fastadv_jax import models
from fastadv_jax.data import datasets
from fastadv_jax.training import (checkpointing, config_validation, model_config, monitoring,
                                  saved_run, workdir)

# The state_dict buffers of the input normalisation: (key, config field, value meaning "none").
NORMALIZATION_KEYS = (("mu", "input_mean", 0.0), ("sigma", "input_std", 1.0))


class InteropError(ValueError):
  """A state_dict or model that cannot be converted."""


def exportable() -> tuple[str, ...]:
  """The registered models that have a PyTorch layout (read at call time: plugins add)."""
  return tuple(n for n in models.names() if models.get(n).torch is not None)


def torch_layout(config: ml_collections.ConfigDict) -> models.TorchLayout:
  """config.model's PyTorch layout, from its record; InteropError if it has none."""
  try:
    layout = models.get(config.model).torch
  except ValueError as e:
    raise InteropError(f"config.model: {e}") from None
  if layout is None:
    raise InteropError(f"config.model: PyTorch interop supports {exportable()}, not "
                       f"{config.model!r} (its models.ModelSpec has no torch layout)")
  return layout


def check_supported(config: ml_collections.ConfigDict) -> None:
  """InteropError unless config.model has a PyTorch layout."""
  torch_layout(config)


def _layout(config: ml_collections.ConfigDict, params: Mapping, image_shape: tuple
            ) -> list[models.TorchEntry]:
  return list(torch_layout(config).entries(model_config.model_args(config), params,
                                            tuple(image_shape)))


def normalization(config: ml_collections.ConfigDict) -> dict[str, tuple[float, ...]]:
  """{"input_mean": ..., "input_std": ...} of the config, as floats (empty: no normalisation)."""
  return {field: tuple(float(v) for v in config[field])
          for _, field, _ in NORMALIZATION_KEYS}


def _check_normalization(config: ml_collections.ConfigDict, sd: Mapping, channels: int) -> None:
  """InteropError naming the key if a `mu` / `sigma` buffer of `sd` disagrees with the config."""
  norm = normalization(config)
  for key, field, neutral in NORMALIZATION_KEYS:
    if key not in sd:
      continue
    with np.errstate(over="ignore"):
      got = np.asarray(sd[key]).astype(np.float32).reshape(-1)
    want = np.asarray(norm[field] or (neutral,) * channels, np.float32)
    shown = ", ".join(f"{v:.6g}" for v in got[:8])
    if got.size != channels:
      raise InteropError(f"state_dict[{key!r}] (input normalisation) has {got.size} values, the "
                         f"{channels}-channel input needs {channels}")
    if not np.allclose(got, want, rtol=1e-6, atol=1e-7):
      raise InteropError(f"state_dict[{key!r}] normalises the input with ({shown}) but "
                         f"config.{field} is {norm[field] or '() (none)'}: set "
                         f"--config.{field}=({shown.replace(' ', '')}) to use the model as "
                         "it was trained")


def _get(tree: Mapping, path: tuple) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _dense_to_torch(kernel: np.ndarray, flat_hwc: tuple) -> np.ndarray:
  if not flat_hwc:
    return kernel.T
  h, w, c = flat_hwc
  return kernel.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(kernel.shape[1], -1)


def _dense_from_torch(weight: np.ndarray, flat_hwc: tuple) -> np.ndarray:
  if not flat_hwc:
    return weight.T
  h, w, c = flat_hwc
  return weight.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)


def to_torch_state_dict(config: ml_collections.ConfigDict, variables: Mapping,
                        image_shape: tuple) -> dict[str, np.ndarray]:
  """Flax variables ({'params', 'batch_stats'}) -> a PyTorch state_dict of numpy arrays."""
  params, stats = variables["params"], variables.get("batch_stats", {})
  sd: dict[str, np.ndarray] = {}
  for e in _layout(config, params, image_shape):
    p = _get(params, e.flax)
    if e.kind in ("conv", "conv_bias"):
      sd[f"{e.torch}.weight"] = np.asarray(p["kernel"]).transpose(3, 2, 0, 1)
      if e.kind == "conv_bias":
        sd[f"{e.torch}.bias"] = np.asarray(p["bias"])
    elif e.kind in ("dense", "dense_flat"):
      sd[f"{e.torch}.weight"] = _dense_to_torch(np.asarray(p["kernel"]), e.flat_hwc)
      sd[f"{e.torch}.bias"] = np.asarray(p["bias"])
    else:
      s = _get(stats, e.flax)
      sd.update({f"{e.torch}.weight": np.asarray(p["scale"]),
                 f"{e.torch}.bias": np.asarray(p["bias"]),
                 f"{e.torch}.running_mean": np.asarray(s["mean"]),
                 f"{e.torch}.running_var": np.asarray(s["var"]),
                 f"{e.torch}.num_batches_tracked": np.zeros((), np.int64)})
  for key, field, _ in NORMALIZATION_KEYS:
    values = normalization(config)[field]
    if values:
      sd[key] = np.asarray(values, np.float32).reshape(1, -1, 1, 1)
  # order="C", not ascontiguousarray: that makes num_batches_tracked 1-d, PyTorch's is 0-d
  return {k: np.asarray(v, dtype=np.int64 if v.dtype == np.int64 else np.float32, order="C")
          for k, v in sd.items()}


def from_torch_state_dict(config: ml_collections.ConfigDict, state_dict: Mapping,
                          template: Mapping, image_shape: tuple) -> dict:
  """A PyTorch state_dict (arrays or tensors) -> Flax variables shaped like `template` (the
  variables, or their shapes from jax.eval_shape). Checks the normalisation buffers against the
  config (_check_normalization)."""
  sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v)
        for k, v in state_dict.items()}
  _check_normalization(config, sd, image_shape[2])
  layout = torch_layout(config)
  architecture = _architecture_hint(config, layout, sd)
  used = set()

  def take(key: str, shape: tuple) -> np.ndarray:
    used.add(key)
    return _checked_weight(sd, key, shape, config.model, architecture)

  params = _copy_tree(template["params"])
  stats = _copy_tree(template.get("batch_stats", {}))
  for e in _layout(config, params, image_shape):
    p = _get(params, e.flax)
    if e.kind in ("conv", "conv_bias"):
      k = p["kernel"].shape
      p["kernel"] = take(f"{e.torch}.weight", (k[3], k[2], k[0], k[1])).transpose(2, 3, 1, 0)
      if e.kind == "conv_bias":
        p["bias"] = take(f"{e.torch}.bias", p["bias"].shape)
    elif e.kind in ("dense", "dense_flat"):
      k = p["kernel"].shape
      p["kernel"] = _dense_from_torch(take(f"{e.torch}.weight", (k[1], k[0])), e.flat_hwc)
      p["bias"] = take(f"{e.torch}.bias", p["bias"].shape)
    else:
      s = _get(stats, e.flax)
      p["scale"] = take(f"{e.torch}.weight", p["scale"].shape)
      p["bias"] = take(f"{e.torch}.bias", p["bias"].shape)
      s["mean"] = take(f"{e.torch}.running_mean", s["mean"].shape)
      s["var"] = take(f"{e.torch}.running_var", s["var"].shape)
  unused = sorted(k for k in sd if k not in used and not _known_extra(k, layout))
  if unused:
    raise InteropError(f"state_dict has {len(unused)} key(s) the {config.model} of this config "
                       f"does not have, e.g. {unused[0]!r}: importing it would drop them"
                       f"{architecture}")
  out = {"params": params}
  if stats:
    out["batch_stats"] = stats
  return out


def _checked_weight(sd: Mapping[str, np.ndarray], key: str, shape: tuple, model: str,
                    architecture: str) -> np.ndarray:
  """sd[key] as float32 of `shape`, or a one-line InteropError: missing, not real floating
  point, the wrong shape, not finite, or a negative BatchNorm variance."""
  if key not in sd:
    raise InteropError(f"state_dict has no {key!r} (a {model} needs it; keys found: "
                       f"{', '.join(sorted(sd)[:6])}...){architecture}")
  if not _real_float(sd[key].dtype):
    kind = {"U": "string", "S": "bytes", "O": "object"}.get(sd[key].dtype.kind,
                                                            sd[key].dtype.name)
    raise InteropError(f"state_dict[{key!r}] holds {kind} values: weights must be "
                       "real floating point (float16, bfloat16, float32 or float64)")
  with np.errstate(over="ignore"):  # a value beyond float32 becomes Inf, refused below
    v = sd[key].astype(np.float32)
  if v.shape != tuple(shape):
    raise InteropError(f"state_dict[{key!r}] has shape {v.shape}, the {model} of this "
                       f"config needs {tuple(shape)}{architecture}")
  if not np.all(np.isfinite(v)):
    raise InteropError(f"state_dict[{key!r}] holds {int(np.sum(~np.isfinite(v)))} NaN or Inf "
                       "value(s) (in float32): the model's outputs would not be finite")
  if key.endswith(".running_var") and np.any(v < 0):
    raise InteropError(f"state_dict[{key!r}] has {int(np.sum(v < 0))} value(s) below zero "
                       f"(min {float(np.min(v)):.3g}): a BatchNorm variance cannot be negative, "
                       "and the model's outputs would be NaN")
  return v


def _real_float(dtype: np.dtype) -> bool:
  return dtype.kind == "f" or dtype.name == "bfloat16"


def _known_extra(key: str, layout: models.TorchLayout) -> bool:
  """Keys a state_dict may have beyond its layers: PyTorch's BatchNorm counters, the input
  normalisation buffers (checked against the config), and what the layout says its forward
  pass never reads."""
  return (key.endswith("num_batches_tracked") or key in {k for k, _, _ in NORMALIZATION_KEYS}
          or key.startswith(layout.unused_prefixes))


def _architecture_hint(config: ml_collections.ConfigDict, layout: models.TorchLayout,
                       sd: Mapping) -> str:
  """"; the state_dict is a <model> with depth=..., this config has ...: set ..." when the
  layout can read the architecture off the state_dict and it differs from the config's; ""
  otherwise (the error then names only the tensor)."""
  if layout.fields is None:
    return ""
  try:
    found = layout.fields(sd)
  except Exception:  # pylint: disable=broad-except  (a hint only: the error says the rest)
    return ""
  args = model_config.model_args(config)
  differ = {k: v for k, v in found.items() if getattr(args, k, None) != v}
  if not differ:
    return ""
  has = ", ".join(f"{k}={v}" for k, v in found.items())
  want = ", ".join(f"{k}={getattr(args, k, None)}" for k in found)
  flags = " ".join(f"--config.model_args.{config.model}.{k}={v}" for k, v in differ.items())
  return f"; the state_dict is a {config.model} with {has}, this config has {want}: set {flags}"


def _copy_tree(tree: Mapping) -> dict:
  """The nested dicts copied; array leaves copied, shape-only leaves (jax.ShapeDtypeStruct, no
  __array__) kept: every one the layout covers is replaced by a converted array."""
  return {k: (_copy_tree(v) if isinstance(v, Mapping)
              else np.array(v) if hasattr(v, "__array__") else v) for k, v in tree.items()}


def torch_spec(config: ml_collections.ConfigDict, num_classes: int, image_shape: tuple) -> dict:
  """The architecture (the model's name) and constructor arguments of this config, as the
  export's model.py (torch_models.build for the built-in models) reads them from spec.json."""
  kwargs = torch_layout(config).kwargs(model_config.model_args(config), num_classes,
                                       tuple(image_shape))
  norm = normalization(config)
  if norm["input_mean"] or norm["input_std"]:  # only then: other exports' spec.json unchanged
    kwargs = {**kwargs, "mean": list(norm["input_mean"]), "std": list(norm["input_std"])}
  return {"architecture": config.model, "kwargs": kwargs}


def write_export(out_dir: str, config: ml_collections.ConfigDict, variables: Mapping,
                 num_classes: int, image_shape: tuple, info: dict | None = None) -> list[str]:
  """Writes state_dict.npz, spec.json, model.py (the layout's module_file, by default
  torch_models.py) and, when PyTorch is installed, model.pt. Returns the paths written."""
  module_file = (torch_layout(config).module_file
                 or os.path.join(os.path.dirname(__file__), "torch_models.py"))
  os.makedirs(out_dir, exist_ok=True)
  sd = to_torch_state_dict(config, variables, image_shape)
  paths = [os.path.join(out_dir, n) for n in ("state_dict.npz", "spec.json", "model.py")]
  np.savez(paths[0], **sd)
  with open(paths[1], "w") as f:
    json.dump({**torch_spec(config, num_classes, image_shape), **(info or {})}, f, indent=2)
  shutil.copyfile(module_file, paths[2])
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return paths
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, os.path.join(out_dir, "model.pt"))
  return paths + [os.path.join(out_dir, "model.pt")]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state_dict from .npz, or from .pt/.pth (needs PyTorch; a {'state_dict': ...} or
  {'model': ...} wrapper, as training scripts save, is unwrapped)."""
  if path.endswith(".npz"):
    with np.load(path) as npz:
      return {k: np.array(npz[k]) for k in npz.files}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise InteropError(f"reading {path} needs PyTorch (pip install 'fastadv_jax[torch]'); or "
                       "save the state_dict as .npz (numpy.savez)") from None
  obj = torch.load(path, map_location="cpu")
  for wrapper in ("state_dict", "model", "model_state_dict"):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      obj = obj[wrapper]
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def import_to_workdir(config: ml_collections.ConfigDict, state_dict_path: str, workdir_: str
                      ) -> int:
  """Converts a state_dict file, then writes <workdir_>/config.json and checkpoint 0 (the
  weights as both last and early-stopped ones, variables alone: an import has no optimiser
  state); returns the number of arrays filled (every parameter and BatchNorm statistic; the
  state_dict's counters and normalisation buffers are not counted)."""
  config_validation.validate_config(config)
  check_supported(config)
  if not os.path.exists(state_dict_path):
    raise InteropError(f"--state_dict: {state_dict_path} does not exist")
  if os.path.isdir(os.path.join(workdir_, "checkpoints")):
    raise workdir.WorkdirError(f"--workdir: {workdir_} already has checkpoints; use a new folder")
  sd = read_state_dict(state_dict_path)
  converted = from_torch_state_dict(config, sd, saved_run.variables_template(config),
                                    datasets.IMAGE_SHAPES[config.dataset])
  variables = {"params": converted["params"], "batch_stats": converted.get("batch_stats", {})}
  workdir.prepare(workdir_)
  meta = {**monitoring.RunRecord().to_json(), "imported_from": os.path.abspath(state_dict_path)}
  ckpt = checkpointing.Checkpointer(workdir_)
  try:
    ckpt.save_variables(0, variables, meta)
  finally:
    ckpt.close()
  workdir.record_config(config, workdir_)
  return len(jax.tree.leaves(variables))
