"""PyTorch interop: export then import reproduces the model; the exported layout is what an
NCHW PyTorch forward pass expects (checked with a numpy NCHW forward pass, and with PyTorch itself
where the optional .venv-torch exists); the command lines round-trip a trained run."""
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from fastadv_jax import models, saved_run, torch_interop, train

SHAPE = (28, 28, 1)


def _variables(config, seed):
  """Random variables with non-trivial BatchNorm statistics (so their mapping is tested)."""
  model = models.create_model(config, 10, half_precision=False)
  v = model.init(jax.random.key(seed), np.zeros((1,) + SHAPE, np.float32), train=False)
  v = jax.tree.map(np.asarray, v)
  rng = np.random.default_rng(seed)
  if "batch_stats" in v:
    v["batch_stats"] = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(np.float32),
                                    v["batch_stats"])
  v["params"] = jax.tree.map(lambda a: a + rng.normal(scale=0.05, size=a.shape).astype(np.float32),
                             v["params"])
  return model, v


CONFIGS = {
    "preact_resnet18": dict(model="preact_resnet18", resnet_widths=(4, 8, 8, 16)),
    "cnn": dict(model="cnn", n_filters=3, n_layers=2),
    "small_cnn": dict(model="small_cnn", n_filters=4),
    "small_cnn_no_bn": dict(model="small_cnn", n_filters=4, use_batch_norm=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_then_import_reproduces_the_logits(name):
  config = tiny_config(**CONFIGS[name])
  model, v = _variables(config, 0)
  _, template = _variables(config, 1)
  sd = torch_interop.to_torch_state_dict(config, v, SHAPE)
  back = torch_interop.from_torch_state_dict(config, sd, template, SHAPE)
  x = np.random.default_rng(2).uniform(size=(5,) + SHAPE).astype(np.float32)
  np.testing.assert_allclose(model.apply(back, x, train=False), model.apply(v, x, train=False),
                             atol=1e-5)
  assert jax.tree.structure(back) == jax.tree.structure(v)


def _conv_nchw(x, w, b=None, stride=1):
  k = w.shape[-1]
  xp = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
  win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
  out = np.einsum("ncijkl,ockl->noij", win, w)
  return out if b is None else out + b[None, :, None, None]


def _bn(x, sd, p):
  return ((x - sd[p + ".running_mean"][None, :, None, None])
          / np.sqrt(sd[p + ".running_var"][None, :, None, None] + 1e-5)
          * sd[p + ".weight"][None, :, None, None] + sd[p + ".bias"][None, :, None, None])


def _numpy_torch_forward(name, sd, x):
  """The PyTorch modules' forward pass (torch_models.py), written in numpy on NCHW input."""
  relu = lambda a: np.maximum(a, 0)  # noqa: E731
  if name == "cnn":
    out = relu(_conv_nchw(x, sd["_model.0.weight"], sd["_model.0.bias"]))
    out = relu(_conv_nchw(out, sd["_model.2.weight"], sd["_model.2.bias"]))
    return out.reshape(len(x), -1) @ sd["_model.5.weight"].T + sd["_model.5.bias"]
  out = x
  for i in range(2):
    out = _conv_nchw(out, sd[f"conv{i}.weight"], sd.get(f"conv{i}.bias"))
    out = _bn(out, sd, f"bn{i}") if f"bn{i}.weight" in sd else out
    n, c, h, w = out.shape
    out = relu(out).reshape(n, c, h // 2, 2, w // 2, 2).max((3, 5))
  out = relu(out.reshape(len(x), -1) @ sd["fc.weight"].T + sd["fc.bias"])
  return out @ sd["linear.weight"].T + sd["linear.bias"]


@pytest.mark.parametrize("name", ["cnn", "small_cnn", "small_cnn_no_bn"])
def test_the_exported_layout_is_what_an_nchw_forward_pass_expects(name):
  config = tiny_config(**CONFIGS[name])
  model, v = _variables(config, 0)
  sd = torch_interop.to_torch_state_dict(config, v, SHAPE)
  x = np.random.default_rng(3).uniform(size=(4,) + SHAPE).astype(np.float32)
  np.testing.assert_allclose(_numpy_torch_forward(name, sd, x.transpose(0, 3, 1, 2)),
                             model.apply(v, x, train=False), atol=1e-4)


def test_import_tolerates_extra_keys_and_names_what_is_missing_or_misshapen():
  config = tiny_config(**CONFIGS["small_cnn"])
  _, v = _variables(config, 0)
  sd = torch_interop.to_torch_state_dict(config, v, SHAPE)
  wrapped = {"module." + k: a for k, a in sd.items()}
  wrapped["module.normalize.mu"] = np.zeros(3, np.float32)
  back = torch_interop.from_torch_state_dict(config, wrapped, v, SHAPE)
  np.testing.assert_array_equal(back["params"]["fc"]["kernel"], v["params"]["fc"]["kernel"])
  missing = {k: a for k, a in sd.items() if k != "bn1.running_var"}
  with pytest.raises(torch_interop.InteropError, match="no 'bn1.running_var'"):
    torch_interop.from_torch_state_dict(config, missing, v, SHAPE)
  with pytest.raises(torch_interop.InteropError, match=r"'conv0.weight'.*shape"):
    torch_interop.from_torch_state_dict(tiny_config(**dict(CONFIGS["small_cnn"], n_filters=8)),
                                        sd, _variables(tiny_config(**dict(
                                            CONFIGS["small_cnn"], n_filters=8)), 1)[1], SHAPE)
  with pytest.raises(torch_interop.InteropError, match="supports"):
    torch_interop.torch_spec(tiny_config(model="wide_resnet"), 10, SHAPE)


def test_a_trained_run_round_trips_through_the_files(tmp_path, mock_fashion_mnist):
  config = tiny_config(num_epochs=1)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  config, v, _ = saved_run.load_run(str(tmp_path / "run"))
  paths = torch_interop.write_export(str(tmp_path / "export"), config, v, 10, SHAPE)
  assert {os.path.basename(p) for p in paths} >= {"state_dict.npz", "spec.json", "model.py"}
  spec = json.loads((tmp_path / "export" / "spec.json").read_text())
  assert spec == torch_interop.torch_spec(config, 10, SHAPE)
  torch_interop.import_to_workdir(config, str(tmp_path / "export" / "state_dict.npz"),
                                 str(tmp_path / "imported"))
  _, back, step = saved_run.load_run(str(tmp_path / "imported"))
  assert step == 0
  jax.tree.map(np.testing.assert_array_equal, back, v)
  _, best, _ = saved_run.load_run(str(tmp_path / "imported"), "best")
  jax.tree.map(np.testing.assert_array_equal, best, v)


@pytest.mark.parametrize("name", ["cnn", "small_cnn_no_bn"])
def test_a_model_without_batchnorm_imports_and_reads_back(name, tmp_path):
  """No batch_stats in the variables: the variables-only checkpoint still reads back exactly
  (it failed with 'tree structures do not match' when the import built a train state)."""
  config = tiny_config(**CONFIGS[name])
  _, v = _variables(config, 2)
  sd = torch_interop.to_torch_state_dict(config, v, SHAPE)
  np.savez(tmp_path / "sd.npz", **sd)
  torch_interop.import_to_workdir(config, str(tmp_path / "sd.npz"), str(tmp_path / "imported"))
  _, back, step = saved_run.load_run(str(tmp_path / "imported"))
  assert step == 0 and not back.get("batch_stats")
  jax.tree.map(np.testing.assert_array_equal, back["params"], v["params"])


TORCH = ROOT / ".venv-torch" / "bin" / "python"


@pytest.mark.skipif(not TORCH.exists(), reason="needs the PyTorch environment "
                    "(bash scripts/setup_bench.sh)")
@pytest.mark.parametrize("name", ["preact_resnet18", "cnn", "small_cnn"])
def test_pytorch_runs_the_export_with_the_same_logits(name, tmp_path):
  config = tiny_config(**CONFIGS[name])
  model, v = _variables(config, 0)
  torch_interop.write_export(str(tmp_path), config, v, 10, SHAPE)
  x = np.random.default_rng(4).uniform(size=(6,) + SHAPE).astype(np.float32)
  np.save(tmp_path / "x.npy", x.transpose(0, 3, 1, 2))
  code = ("import sys, numpy as np, torch; sys.path.insert(0, sys.argv[1]); import model; "
          "net = model.load(sys.argv[1]); x = torch.from_numpy(np.load(sys.argv[1] + '/x.npy')); "
          "np.save(sys.argv[1] + '/y.npy', net(x).detach().numpy())")
  subprocess.run([str(TORCH), "-c", code, str(tmp_path)], check=True, timeout=120)
  np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model.apply(v, x, train=False),
                             atol=1e-4)
