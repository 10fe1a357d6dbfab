"""Models to and from PyTorch state_dicts, in the layout of the original code (torch_models.py).

The conversions are plain numpy, so exporting needs no PyTorch; writing or reading a `.pt` file
does (`pip install fastadv_jax[torch]`), a `.npz` of the same arrays does not. What changes
between the frameworks:
  - conv kernels: Flax HWIO (kh, kw, in, out) <-> PyTorch OIHW (out, in, kh, kw);
  - dense kernels: (in, out) <-> (out, in); after a flatten, Flax flattens NHWC in (h, w, c)
    order and PyTorch NCHW in (c, h, w) order, so the input axis is permuted as well;
  - BatchNorm: scale/bias/mean/var <-> weight/bias/running_mean/running_var, eps 1e-5 in both
    (models.py); PyTorch's `num_batches_tracked` is written as 0 and ignored on import;
  - biases: the ResNets' convs have none in either layout.
Import tolerates keys the original code has beyond these (e.g. `num_batches_tracked`, a
`normalize` buffer) and a DataParallel `module.` prefix; a missing key or a shape that does not
fit is an error naming it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from fastadv_jax import checkpointing, config_validation, datasets, models, monitoring, workdir
from fastadv_jax import train_state as ts

SUPPORTED = ("preact_resnet18", "cnn", "small_cnn")


class InteropError(ValueError):
  """A state_dict or model that cannot be converted."""


@dataclasses.dataclass(frozen=True)
class _Entry:
  torch: str          # key prefix in the state_dict
  flax: tuple         # module path in the Flax variables
  kind: str           # conv | conv_bias | dense | dense_flat | bn
  flat_hwc: tuple = ()  # dense_flat: the (h, w, c) shape that was flattened


def check_supported(config: ml_collections.ConfigDict) -> None:
  """InteropError unless config.model has a PyTorch layout here."""
  if config.model not in SUPPORTED:
    raise InteropError(f"config.model: PyTorch interop supports {SUPPORTED}, not "
                       f"{config.model!r}")


def _layout(config: ml_collections.ConfigDict, params: Mapping, image_shape: tuple
            ) -> list[_Entry]:
  check_supported(config)
  h, w, _ = image_shape
  if config.model == "preact_resnet18":
    out = [_Entry("conv1", ("conv1",), "conv")]
    for stage in range(4):
      for block in range(2):
        t, f = f"layer{stage + 1}.{block}", f"layer{stage + 1}_{block}"
        out += [_Entry(f"{t}.bn1", (f, "bn1"), "bn"), _Entry(f"{t}.conv1", (f, "conv1"), "conv"),
                _Entry(f"{t}.bn2", (f, "bn2"), "bn"), _Entry(f"{t}.conv2", (f, "conv2"), "conv")]
        if "shortcut" in params[f]:
          out.append(_Entry(f"{t}.shortcut.0", (f, "shortcut"), "conv"))
    return out + [_Entry("bn", ("bn",), "bn"), _Entry("linear", ("linear",), "dense")]
  if config.model == "cnn":
    out = []
    for i in range(config.n_layers):
      out += [_Entry(f"_model.{2 * i}", (f"conv{i}",), "conv_bias")]
    return out + [_Entry(f"_model.{2 * config.n_layers + 1}", ("linear",), "dense_flat",
                         (h, w, config.n_filters))]
  out = []  # small_cnn
  kind = "conv" if config.use_batch_norm else "conv_bias"
  for i in range(2):
    out.append(_Entry(f"conv{i}", (f"conv{i}",), kind))
    if config.use_batch_norm:
      out.append(_Entry(f"bn{i}", (f"bn{i}",), "bn"))
  return out + [_Entry("fc", ("fc",), "dense_flat", (h // 4, w // 4, 2 * config.n_filters)),
                _Entry("linear", ("linear",), "dense")]


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
  return {k: np.ascontiguousarray(v, dtype=np.int64 if v.dtype == np.int64 else np.float32)
          for k, v in sd.items()}


def from_torch_state_dict(config: ml_collections.ConfigDict, state_dict: Mapping,
                          template: Mapping, image_shape: tuple) -> dict:
  """A PyTorch state_dict (arrays or tensors) -> Flax variables shaped like `template`."""
  sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v)
        for k, v in state_dict.items()}

  def take(key: str, shape: tuple) -> np.ndarray:
    if key not in sd:
      raise InteropError(f"state_dict has no {key!r} (a {config.model} needs it; keys found: "
                         f"{', '.join(sorted(sd)[:6])}...)")
    v = sd[key].astype(np.float32)
    if v.shape != tuple(shape):
      raise InteropError(f"state_dict[{key!r}] has shape {v.shape}, the {config.model} of this "
                         f"config needs {tuple(shape)}")
    return v

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
  out = {"params": params}
  if stats:
    out["batch_stats"] = stats
  return out


def _copy_tree(tree: Mapping) -> dict:
  return {k: (_copy_tree(v) if isinstance(v, Mapping) else np.array(v)) for k, v in tree.items()}


def torch_spec(config: ml_collections.ConfigDict, num_classes: int, image_shape: tuple) -> dict:
  """The architecture and arguments of torch_models.build for this config."""
  check_supported(config)
  h, w, c = image_shape
  if config.model == "preact_resnet18":
    kwargs = dict(num_classes=num_classes, in_channels=c, stage_widths=list(config.resnet_widths))
  elif config.model == "cnn":
    kwargs = dict(num_classes=num_classes, in_channels=c, height=h, width=w,
                  n_filters=config.n_filters, n_layers=config.n_layers)
  else:  # small_cnn
    kwargs = dict(num_classes=num_classes, in_channels=c, height=h, width=w,
                  n_filters=config.n_filters, use_batch_norm=config.use_batch_norm)
  return {"architecture": config.model, "kwargs": kwargs}


def write_export(out_dir: str, config: ml_collections.ConfigDict, variables: Mapping,
                 num_classes: int, image_shape: tuple, info: dict | None = None) -> list[str]:
  """Writes state_dict.npz, spec.json, model.py (torch_models.py) and, when PyTorch is
  installed, model.pt. Returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  sd = to_torch_state_dict(config, variables, image_shape)
  paths = [os.path.join(out_dir, n) for n in ("state_dict.npz", "spec.json", "model.py")]
  np.savez(paths[0], **sd)
  with open(paths[1], "w") as f:
    json.dump({**torch_spec(config, num_classes, image_shape), **(info or {})}, f, indent=2)
  shutil.copyfile(os.path.join(os.path.dirname(__file__), "torch_models.py"), paths[2])
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
  weights as both last and early-stopped ones); returns the number of tensors read."""
  config_validation.validate_config(config)
  check_supported(config)
  if not os.path.exists(state_dict_path):
    raise InteropError(f"--state_dict: {state_dict_path} does not exist")
  if os.path.isdir(os.path.join(workdir_, "checkpoints")):
    raise workdir.WorkdirError(f"--workdir: {workdir_} already has checkpoints; use a new folder")
  sd = read_state_dict(state_dict_path)
  shape = datasets.IMAGE_SHAPES[config.dataset]
  model = models.create_model(config, datasets.NUM_CLASSES[config.dataset], half_precision=False)
  state = ts.create_train_state(config, model, jax.random.key(0), shape, 1)
  variables = from_torch_state_dict(config, sd, ts.variables(state), shape)
  state = state.replace(params=variables["params"],
                        batch_stats=variables.get("batch_stats", {}))
  workdir.prepare(workdir_)
  meta = {**monitoring.RunRecord().to_json(), "imported_from": os.path.abspath(state_dict_path)}
  ckpt = checkpointing.Checkpointer(workdir_)
  try:
    ckpt.save(0, state, variables, meta)
  finally:
    ckpt.close()
  workdir.record_config(config, workdir_)
  return len(sd)
