"""PyTorch interop: export then import reproduces the model; the exported layout is what an
NCHW PyTorch forward pass expects (checked with a numpy NCHW forward pass, and with PyTorch itself
where the optional .venv-torch exists); the command lines round-trip a trained run. WideResNets
in RobustBench's layout at every size, and the input normalisation's mu / sigma buffers."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import MOCK_DATA_CLI, ROOT, TORCH_PY, needs_torch, tiny_config, torch_logits
from fastadv_jax.interop import torch_interop
from fastadv_jax.training import config_validation, model_config, saved_run, train

SHAPE = (28, 28, 1)


def _variables(config, seed):
  """Random variables with non-trivial BatchNorm statistics (so their mapping is tested)."""
  model = model_config.create_model(config, 10, half_precision=False)
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
    "preact_resnet18": dict(model="preact_resnet18", stage_widths=(4, 8, 8, 16)),
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


def test_import_names_what_is_missing_misshapen_or_left_over():
  config = tiny_config(**CONFIGS["small_cnn"])
  _, v = _variables(config, 0)
  sd = torch_interop.to_torch_state_dict(config, v, SHAPE)
  wrapped = {"module." + k: a for k, a in sd.items()}  # DataParallel's prefix is dropped
  back = torch_interop.from_torch_state_dict(config, wrapped, v, SHAPE)
  np.testing.assert_array_equal(back["params"]["fc"]["kernel"], v["params"]["fc"]["kernel"])
  # A key no layer reads would be dropped: refused, named.
  wrapped["module.normalize.mu"] = np.zeros(3, np.float32)
  with pytest.raises(torch_interop.InteropError,
                     match=r"1 key\(s\) the small_cnn of this config does not have, e\.g\. "
                           r"'normalize\.mu'"):
    torch_interop.from_torch_state_dict(config, wrapped, v, SHAPE)
  missing = {k: a for k, a in sd.items() if k != "bn1.running_var"}
  with pytest.raises(torch_interop.InteropError, match="no 'bn1.running_var'"):
    torch_interop.from_torch_state_dict(config, missing, v, SHAPE)
  with pytest.raises(torch_interop.InteropError, match=r"'conv0.weight'.*shape"):
    torch_interop.from_torch_state_dict(tiny_config(**dict(CONFIGS["small_cnn"], n_filters=8)),
                                        sd, _variables(tiny_config(**dict(
                                            CONFIGS["small_cnn"], n_filters=8)), 1)[1], SHAPE)
  with pytest.raises(torch_interop.InteropError, match="supports"):
    torch_interop.torch_spec(tiny_config(model="resnet18"), 10, SHAPE)


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





@needs_torch
@pytest.mark.parametrize("name", ["preact_resnet18", "cnn", "small_cnn"])
def test_pytorch_runs_the_export_with_the_same_logits(name, tmp_path):
  config = tiny_config(**CONFIGS[name])
  model, v = _variables(config, 0)
  torch_interop.write_export(str(tmp_path), config, v, 10, SHAPE)
  x = np.random.default_rng(4).uniform(size=(6,) + SHAPE).astype(np.float32)
  np.testing.assert_allclose(torch_logits(tmp_path, x), model.apply(v, x, train=False),
                             atol=1e-4)


# ----------------------------------------------------------------------------------------------
# WideResNets in RobustBench's layout, and the input normalisation (mu / sigma buffers).

CIFAR = (32, 32, 3)
WRN_SIZES = [(d, k) for d in (28, 34, 70) for k in (10, 16)]
NORM = dict(input_mean=(0.4914, 0.4822, 0.4465), input_std=(0.2471, 0.2435, 0.2616))


def _wrn_config(depth, widen, norm=False, **overrides):
  return tiny_config(**{"model": "wide_resnet", "dataset": "cifar10", "depth": depth,
                        "widen": widen, **(NORM if norm else {}), **overrides})


def _shapes(config):
  """The variables' shapes (jax.eval_shape: nothing allocated, WRN-70-16 is 267M parameters)."""
  model = model_config.create_model(config, 10, half_precision=False)
  return jax.eval_shape(model.init, jax.random.key(0), np.zeros((1,) + CIFAR, np.float32))


def _random_like(shapes, seed):
  """Random float32 values in [0, 1) for every leaf (a valid BatchNorm variance too): views of
  one pool at random offsets, so WRN-70-16's 267M values cost no time or memory; within a leaf
  (at most 9.4M values) they are distinct, and two leaves of one shape differ."""
  rng = np.random.default_rng(seed)
  pool = rng.random(1 << 24, np.float32)

  def leaf(s):
    size = int(np.prod(s.shape))
    start = int(rng.integers(0, pool.size - size + 1))
    return pool[start:start + size].reshape(s.shape)

  return jax.tree.map(leaf, shapes)


# Every size once; with normalisation (mu, sigma) for one widen factor of each depth.
@pytest.mark.parametrize("depth,widen,norm", [(28, 10, False), (28, 16, True), (34, 10, True),
                                              (34, 16, False), (70, 10, True), (70, 16, False)])
def test_every_wide_resnet_size_round_trips_bit_exactly(depth, widen, norm):
  config = _wrn_config(depth, widen, norm)
  shapes = _shapes(config)
  v = _random_like(shapes, depth + widen)
  sd = torch_interop.to_torch_state_dict(config, v, CIFAR)
  assert ("mu" in sd and "sigma" in sd) == norm
  if norm:
    np.testing.assert_array_equal(sd["mu"], np.float32(NORM["input_mean"]).reshape(1, 3, 1, 1))
    np.testing.assert_array_equal(sd["sigma"], np.float32(NORM["input_std"]).reshape(1, 3, 1, 1))
  back = torch_interop.from_torch_state_dict(config, sd, shapes, CIFAR)
  del sd
  assert jax.tree.structure(back) == jax.tree.structure(v)
  assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in jax.tree.leaves(back))
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, v)))


def test_wide_resnet_shortcuts_are_robustbenchs_convshortcuts():
  """RobustBench has `convShortcut` exactly where a block changes the width: the first block of
  groups 2 and 3, and of group 1 unless widen_factor is 1 (16 -> 16 channels)."""
  for widen, first in ((1, ["block2", "block3"]), (2, ["block1", "block2", "block3"])):
    config = _wrn_config(16, widen)
    v = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), _shapes(config))
    sd = torch_interop.to_torch_state_dict(config, v, CIFAR)
    assert sorted(k for k in sd if "convShortcut" in k) == [
        f"{g}.layer.0.convShortcut.weight" for g in first]
    assert {k.split(".")[0] for k in sd} == {"conv1", "block1", "block2", "block3", "bn1", "fc"}
    assert sd["fc.bias"].shape == (10,) and sd["block1.layer.1.bn2.running_var"].shape == (
        16 * widen,)


@pytest.mark.parametrize("depth,widen,file_depth,file_widen", [
    (10, 1, 16, 1),   # the file's second block of each group would be dropped
    (16, 1, 10, 1),   # the config's second blocks would stay random
    (10, 1, 10, 2),   # every conv of another width
])
def test_a_wide_resnet_of_another_size_is_refused_with_both_architectures(
    depth, widen, file_depth, file_widen):
  config, file_config = _wrn_config(depth, widen), _wrn_config(file_depth, file_widen)
  sd = _robustbench_checkpoint(torch_interop.to_torch_state_dict(
      file_config, _random_like(_shapes(file_config), 0), CIFAR))
  with pytest.raises(torch_interop.InteropError) as e:
    torch_interop.from_torch_state_dict(config, sd, _shapes(config), CIFAR)
  line = str(e.value)
  assert "\n" not in line
  assert (f"the state_dict is a wide_resnet with depth={file_depth}, widen={file_widen}, "
          f"this config has depth={depth}, widen={widen}: set ") in line, line
  assert (f"--config.model_args.wide_resnet.depth={file_depth}" in line) == (
      depth != file_depth), line
  assert (f"--config.model_args.wide_resnet.widen={file_widen}" in line) == (
      widen != file_widen), line
  # The same file with the named settings imports.
  torch_interop.from_torch_state_dict(file_config, sd, _shapes(file_config), CIFAR)


@pytest.mark.parametrize("dtype", [np.bool_, np.int32, np.complex64, np.str_])
def test_a_tensor_that_is_not_real_floating_point_is_refused(dtype):
  config = tiny_config(**CONFIGS["cnn"])
  _, v = _variables(config, 0)
  sd = torch_interop.to_torch_state_dict(config, v, SHAPE)
  sd["_model.0.bias"] = np.ones(sd["_model.0.bias"].shape, dtype)
  with pytest.raises(torch_interop.InteropError,
                     match=r"state_dict\['_model\.0\.bias'\] holds \w+ values: weights must be "
                           r"real floating point"):
    torch_interop.from_torch_state_dict(config, sd, v, SHAPE)
  sd["_model.0.bias"] = sd["_model.0.weight"].sum((1, 2, 3)).astype(np.float64)  # lossless: ok
  torch_interop.from_torch_state_dict(config, sd, v, SHAPE)


def test_a_cnn_of_other_layers_says_which():
  config, other = tiny_config(**CONFIGS["cnn"]), tiny_config(**dict(CONFIGS["cnn"], n_layers=3))
  sd = torch_interop.to_torch_state_dict(other, _variables(other, 0)[1], SHAPE)
  with pytest.raises(torch_interop.InteropError, match=r"n_layers=3, n_filters=3, this config "
                     r"has n_layers=2, n_filters=3: set --config\.model_args\.cnn\.n_layers=3$"):
    torch_interop.from_torch_state_dict(config, sd, _variables(config, 0)[1], SHAPE)


def _robustbench_checkpoint(sd):
  """`sd` as RobustBench's TRADES-style checkpoints are: a DataParallel `module.` prefix, a
  `sub_block1` beside block1, float64 normalisation buffers, num_batches_tracked counts."""
  out = {}
  for k, a in sd.items():
    a = np.full((), 1234, np.int64) if k.endswith("num_batches_tracked") else a
    out["module." + k] = a.astype(np.float64) if k in ("mu", "sigma") else a
    if k.startswith("block1."):
      out["module.sub_block1." + k[len("block1."):]] = a + np.ones_like(a)
  return out


def test_import_checks_the_normalisation_buffers_against_the_config():
  config, plain = _wrn_config(10, 1, True), _wrn_config(10, 1)
  shapes = _shapes(config)
  v = _random_like(shapes, 5)
  sd = _robustbench_checkpoint(torch_interop.to_torch_state_dict(config, v, CIFAR))
  back = torch_interop.from_torch_state_dict(config, sd, shapes, CIFAR)
  jax.tree.map(np.testing.assert_array_equal, back, v)
  # a model trained on normalised inputs, imported without normalisation: refused
  with pytest.raises(torch_interop.InteropError,
                     match=r"state_dict\['mu'\] normalises the input .* config.input_mean is \(\)"):
    torch_interop.from_torch_state_dict(plain, sd, shapes, CIFAR)
  other = _wrn_config(10, 1, True, input_std=(0.25, 0.25, 0.25))
  with pytest.raises(torch_interop.InteropError, match=r"'sigma'.*config.input_std"):
    torch_interop.from_torch_state_dict(other, sd, shapes, CIFAR)
  bad = dict(sd, **{"module.mu": np.zeros(4, np.float32)})
  with pytest.raises(torch_interop.InteropError, match=r"'mu'.*has 4 values.* needs 3"):
    torch_interop.from_torch_state_dict(config, bad, shapes, CIFAR)
  # buffers that do nothing (mean 0, std 1) agree with no normalisation; none at all with any
  neutral = dict(sd, **{"module.mu": np.zeros((1, 3, 1, 1)), "module.sigma": np.ones(3)})
  torch_interop.from_torch_state_dict(plain, neutral, shapes, CIFAR)
  bare = {k: a for k, a in sd.items() if k not in ("module.mu", "module.sigma")}
  for c in (config, plain):
    jax.tree.map(np.testing.assert_array_equal,
                 torch_interop.from_torch_state_dict(c, bare, shapes, CIFAR), v)


def test_a_wide_resnet_of_another_size_is_refused_naming_the_tensor():
  sd = torch_interop.to_torch_state_dict(
      _wrn_config(10, 1), _random_like(_shapes(_wrn_config(10, 1)), 7), CIFAR)
  deeper, wider = _wrn_config(16, 1), _wrn_config(10, 2)
  with pytest.raises(torch_interop.InteropError, match=r"no 'block1.layer.1.bn1.weight'"):
    torch_interop.from_torch_state_dict(deeper, sd, _shapes(deeper), CIFAR)
  with pytest.raises(torch_interop.InteropError,
                     match=r"'block1.layer.0.conv1.weight'\] has shape \(16, 16, 3, 3\)"):
    torch_interop.from_torch_state_dict(wider, sd, _shapes(wider), CIFAR)


@pytest.mark.parametrize("fields,match", [
    (dict(input_mean=(0.5, 0.5), input_std=(0.2, 0.2, 0.2)), r"input_mean: needs one value .*3"),
    (dict(input_mean=(0.5,) * 3, input_std=()), r"input_std: needs one value per channel"),
    (dict(input_mean=(), input_std=(0.2,) * 3), r"input_mean: needs one value per channel"),
    (dict(input_mean=(0.5,) * 3, input_std=(0.2, 0.0, 0.2)), r"input_std: must be > 0"),
    (dict(input_mean=(0.5, float("nan"), 0.5), input_std=(0.2,) * 3), r"input_mean: must be fin"),
])
def test_the_normalisation_fields_are_validated(fields, match):
  with pytest.raises(config_validation.ConfigError, match=match):
    config_validation.validate_config(_wrn_config(10, 1, **fields))
  with pytest.raises(config_validation.ConfigError, match=r"input_mean: .*fashion_mnist \(1\)"):
    config_validation.validate_config(tiny_config(**NORM))  # fashion_mnist has one channel
  config_validation.validate_config(_wrn_config(10, 1, True))


def test_a_robustbench_checkpoint_imports_through_the_command_line_and_evaluates(tmp_path):
  """The CLI imports a state_dict with RobustBench's extra keys and normalisation buffers into
  a run that records the normalisation and holds the exported weights; evaluate reads it."""
  config = _wrn_config(10, 1, True)
  shapes = _shapes(config)
  v = _random_like(shapes, 6)
  v["params"] = jax.tree.map(lambda a: (a - 0.5) * 0.5, v["params"])
  np.savez(tmp_path / "rb.npz",
           **_robustbench_checkpoint(torch_interop.to_torch_state_dict(config, v, CIFAR)))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="1")

  def cli(module, *args):
    proc = subprocess.run([sys.executable, "-c", MOCK_DATA_CLI, module, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

  wd = tmp_path / "imported"
  cli("fastadv_jax.torch_import", f"--state_dict={tmp_path / 'rb.npz'}",
      f"--config={ROOT}/configs/cifar10.py", f"--workdir={wd}", "--config.model=wide_resnet",
      "--config.model_args.wide_resnet.depth=10", "--config.model_args.wide_resnet.widen=1",
      "--config.data_dir=/nonexistent-use-mock",
      f"--config.input_mean={NORM['input_mean']}", f"--config.input_std={NORM['input_std']}")
  recorded, back, step = saved_run.load_run(str(wd))
  assert step == 0 and tuple(recorded.input_std) == NORM["input_std"]
  jax.tree.map(np.testing.assert_array_equal, back, v)
  cli("fastadv_jax.evaluate", f"--workdir={wd}", "--n_eval=8", "--pgd_steps=1",
      "--pgd_restarts=1")
  out = next(wd.glob("eval_last_*.json"))
  assert 0.0 <= json.loads(out.read_text())["clean_acc"] <= 1.0


_TORCH_SHAPES = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import torch_models
out = {}
for name, spec in json.load(open(sys.argv[2])).items():
  with torch.device("meta"):  # shapes only: nothing allocated
    net = torch_models.build(spec)
  out[name] = {k: list(t.shape) for k, t in net.state_dict().items()}
json.dump(out, open(sys.argv[3], "w"))
"""


@needs_torch
def test_the_pytorch_wide_resnet_has_the_exports_keys_and_shapes(tmp_path):
  """torch_models.WideResNet, built from the export's spec.json for every size, has exactly the
  state_dict keys and shapes the export writes (normalisation buffers included)."""
  specs, expected = {}, {}
  for depth, widen in WRN_SIZES + [(10, 1), (16, 2)]:
    for norm in (False, True) if depth < 28 or (depth, widen) == (28, 10) else (False,):
      config, name = _wrn_config(depth, widen, norm), f"{depth}-{widen}-{norm}"
      zeros = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape), _shapes(config))
      sd = torch_interop.to_torch_state_dict(config, zeros, CIFAR)
      expected[name] = {k: list(a.shape) for k, a in sd.items()}
      specs[name] = torch_interop.torch_spec(config, 10, CIFAR)
      del zeros, sd
  (tmp_path / "specs.json").write_text(json.dumps(specs))
  module_dir = os.path.join(ROOT, "fastadv_jax", "interop")
  subprocess.run([str(TORCH_PY), "-c", _TORCH_SHAPES, module_dir, str(tmp_path / "specs.json"),
                  str(tmp_path / "out.json")], check=True, timeout=300)
  got = json.loads((tmp_path / "out.json").read_text())
  assert got.keys() == expected.keys()
  for name in expected:
    assert got[name] == expected[name], name


@needs_torch
def test_pytorch_runs_exported_wide_resnets_and_normalising_models_with_the_same_logits(
    tmp_path):
  """Small WideResNets (10-1: no shortcut in group 1; 16-2: two blocks a group) with and without
  normalisation, non-trivial BatchNorm statistics, and a normalising small CNN (1 channel)."""
  cases = {f"wrn{d}-{k}-{n}": (_wrn_config(d, k, n), CIFAR)
           for d, k in ((10, 1), (16, 2)) for n in (False, True)}
  cases["small_cnn-norm"] = (tiny_config(**CONFIGS["small_cnn"], input_mean=(0.3,),
                                         input_std=(0.4,)), SHAPE)
  expected = {}
  for i, (name, (config, shape)) in enumerate(cases.items()):
    model = model_config.create_model(config, 10, half_precision=False)
    v = _random_like(jax.eval_shape(model.init, jax.random.key(0),
                                    np.zeros((1,) + shape, np.float32)), i)
    v["params"] = jax.tree.map(lambda a: (a - 0.5) * 0.6, v["params"])
    v["batch_stats"] = jax.tree.map(lambda a: a + 0.5, v["batch_stats"])  # mean, var in [.5, 1.5)
    torch_interop.write_export(str(tmp_path / name), config, v, 10, shape)
    x = np.random.default_rng(10 + i).uniform(size=(4,) + shape).astype(np.float32)
    np.save(tmp_path / name / "x.npy", x.transpose(0, 3, 1, 2))
    expected[name] = np.asarray(model.apply(v, x, train=False))
  code = ("import sys, numpy as np, torch\n"
          "for d in sys.argv[1:]:\n"
          "  sys.path.insert(0, d); import model; net = model.load(d); sys.path.pop(0)\n"
          "  del sys.modules['model']\n"
          "  y = net(torch.from_numpy(np.load(d + '/x.npy'))).detach().numpy()\n"
          "  np.save(d + '/y.npy', y)\n")
  subprocess.run([str(TORCH_PY), "-c", code] + [str(tmp_path / n) for n in cases], check=True,
                 timeout=300)
  for name in cases:
    assert np.std(expected[name]) > 1e-3, name  # the logits say something about the weights
    np.testing.assert_allclose(np.load(tmp_path / name / "y.npy"), expected[name], atol=1e-4,
                               err_msg=name)
