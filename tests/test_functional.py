"""The library as a set of building blocks for someone else's training loop: the functional
GradAlign term on a Flax NNX model equals the trainer's, methods' perturbations called directly,
and methods registered from outside the package, through Python and the command lines."""
import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import MOCK_DATA_CLI, ROOT, TINY_CLI, tiny_config
from fastadv_jax import attacks, gradalign, losses, methods, randomness
from fastadv_jax.methods.base import Method, Perturbation
from fastadv_jax.training import config_validation, model_config, train_step
from fastadv_jax.training import train_state as ts

PLUGINS = ROOT / "tests" / "plugins"


class NNXPaperCNN(nnx.Module):
  """The paper's single-layer CNN written in NNX (conv 3x3 with bias, ReLU, flatten, linear)."""

  def __init__(self, filters: int, rngs: nnx.Rngs):
    self.conv = nnx.Conv(1, filters, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
    self.linear = nnx.Linear(28 * 28 * filters, 10, rngs=rngs)

  def __call__(self, x):
    return self.linear(nnx.relu(self.conv(x)).reshape(x.shape[0], -1))


def _nnx_copy(params, filters):
  """An NNX model holding the linen PaperCNN's weights."""
  m = NNXPaperCNN(filters, nnx.Rngs(0))
  m.conv.kernel[...] = params["conv0"]["kernel"]
  m.conv.bias[...] = params["conv0"]["bias"]
  m.linear.kernel[...] = params["linear"]["kernel"]
  m.linear.bias[...] = params["linear"]["bias"]
  return m


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8),
          "label": rng.integers(0, 10, (n,)).astype(np.int32)}


def test_functional_gradalign_on_an_nnx_model_equals_the_trainers_term():
  """Same weights, batch and noise: the trainer's logged GradAlign value equals
  `gradalign.term` on an NNX model, and so do the term's parameter gradients."""
  c = tiny_config(model="cnn", n_filters=4, method="fgsm", grad_align_lambda=0.5, eps=0.1)
  model = model_config.create_model(c, 10)
  state = ts.create_train_state(c, model, jax.random.key(0), (28, 28, 1), 10)
  batch, rng = _batch(), jax.random.key(42)
  _, metrics = jax.jit(train_step.make_train_step(c, model, 10, axis_name=None))(
      state, batch, rng)
  # The noise keys of step 0 (train_step draws GradAlign's eta from them), and the clean batch
  # (this config has no augmentation).
  _, _, noise_keys = train_step._step_keys(rng, jnp.int32(0), 1, 16, None)
  x, y = jnp.asarray(batch["image"], jnp.float32) / 255.0, jnp.asarray(batch["label"])

  def nnx_term(m):
    loss_fn = lambda z: optax.softmax_cross_entropy_with_integer_labels(m(z), y)  # noqa: E731
    return gradalign.term(loss_fn, x, noise_keys, 0.1, 0.5).loss

  nnx_model = _nnx_copy(state.params, 4)
  value, grads = nnx.value_and_grad(nnx_term)(nnx_model)
  assert float(value) == pytest.approx(float(metrics["train_reg"]), rel=1e-5)
  assert float(value) > 0

  def linen_term(params):
    loss_fn = lambda z: losses.cross_entropy(model.apply({"params": params}, z), y)  # noqa
    return train_step.gradalign_term(c, loss_fn, x, noise_keys, jnp.float32(0.1), None, None)[0]

  linen_grads = jax.grad(linen_term)(state.params)
  np.testing.assert_allclose(grads.conv.kernel[...], linen_grads["conv0"]["kernel"], rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(grads.linear.kernel[...], linen_grads["linear"]["kernel"],
                             rtol=1e-4, atol=1e-7)
  assert float(jnp.max(jnp.abs(grads.conv.kernel[...]))) > 0


def test_gradalign_term_derivatives_agree_and_jvp_refuses_backprop_g1():
  w = jax.random.normal(jax.random.key(0), (36, 3))
  x = jax.random.uniform(jax.random.key(1), (8, 6, 6, 1))
  y = jnp.arange(8) % 3

  def term(w_, derivative):
    loss_fn = lambda z: losses.cross_entropy(jnp.tanh(z.reshape(8, -1) @ w_), y)  # noqa: E731
    return gradalign.term(loss_fn, x, jax.random.key(2), 0.1, 0.7, derivative=derivative).loss

  v1, g1 = jax.value_and_grad(term)(w, "double_backprop")
  v2, g2 = jax.value_and_grad(term)(w, "jvp")
  assert float(v1) == pytest.approx(float(v2), rel=1e-6) and float(v1) > 0
  np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match="does not differentiate through g1"):
    gradalign.term(lambda z: jnp.sum(z, (1, 2, 3)), x, jax.random.key(2), 0.1,
                   derivative="jvp", backprop_g1=True)


def test_functional_perturb_is_the_methods_perturb_and_independent_of_the_device_split():
  x = jax.random.uniform(jax.random.key(0), (16, 6, 6, 1))
  y = jnp.arange(16) % 2
  w = jax.random.normal(jax.random.key(1), (2, 36))
  loss_fn = lambda z: losses.cross_entropy(z.reshape(z.shape[0], -1) @ w.T, y)  # noqa: E731
  key = jax.random.key(7)
  delta = methods.perturb("nfgsm", loss_fn, x, y, key, 0.1).delta
  # Per-example keys folded from the key, as the trainer folds its own.
  keys = randomness.example_keys(key, jnp.arange(16))
  eta = attacks.clip_to_box(randomness.uniform_like(keys, x, -0.2, 0.2), x)
  g = jax.grad(lambda z: jnp.sum(loss_fn(z)))(x + eta)
  np.testing.assert_allclose(delta, attacks.clip_to_box(eta + 0.1 * jnp.sign(g), x), atol=1e-6)
  # The typed args record changes it as the field says; under pmap the same per-example noise.
  wide = methods.perturb("nfgsm", loss_fn, x, y, key, 0.1,
                         args=methods.get("nfgsm").args(noise=0.0)).delta
  np.testing.assert_allclose(wide, attacks.clip_to_box(0.1 * jnp.sign(
      jax.grad(lambda z: jnp.sum(loss_fn(z)))(x)), x), atol=1e-6)

  def per_device(xs, ys):
    lf = lambda z: losses.cross_entropy(z.reshape(z.shape[0], -1) @ w.T, ys)  # noqa: E731
    return methods.perturb("nfgsm", lf, xs, ys, key, 0.1, axis_name="d").delta

  split = jax.pmap(per_device, axis_name="d", devices=jax.local_devices()[:4])(
      x.reshape(4, 4, 6, 6, 1), y.reshape(4, 4))
  np.testing.assert_allclose(np.asarray(split).reshape(delta.shape), delta, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class _ToyArgs:
  scale: float = 0.5


def _toy_perturb(inp):
  return Perturbation(inp.args.scale * inp.eps * jnp.ones_like(inp.x))


def test_a_method_registered_at_run_time_is_validated_and_trained_from_the_live_registry():
  toy = Method("toy_from_test", "a constant perturbation", _toy_perturb, _ToyArgs,
               presets={"toy_preset": {"scale": 0.25}})
  methods.register(toy)
  methods.register(toy)  # the same record again: a no-op
  assert "toy_from_test" in methods.names() and methods.presets()["toy_preset"][0] == toy.name
  c = tiny_config(method="toy_from_test")  # its args are not in this config: the defaults
  config_validation.validate_config(c)
  assert toy.args_from(c) == _ToyArgs(0.5)
  with pytest.raises(ValueError, match="already registered"):
    methods.register(dataclasses.replace(toy, summary="another"))
  with pytest.raises(ValueError, match="already a preset"):
    methods.register(Method("toy_other", "x", _toy_perturb, _ToyArgs,
                            presets={"toy_preset": {}}))
  with pytest.raises(TypeError, match="not fields of _ToyArgs"):
    Method("toy_bad", "x", _toy_perturb, _ToyArgs, presets={"p": {"nope": 1}})
  with pytest.raises(methods.ArgError, match="nope: not a hyperparameter of toy_from_test"):
    toy.make_args({"nope": 1})
  assert toy.make_args({"scale": 1}).scale == 1.0 and isinstance(toy.make_args(
      {"scale": 1}).scale, float)
  # One step of the trainer runs it: the perturbation is the constant the record says.
  model = model_config.create_model(c, 10)
  state = ts.create_train_state(c, model, jax.random.key(0), (28, 28, 1), 10)
  _, m = jax.jit(train_step.make_train_step(c, model, 10, axis_name=None))(
      state, _batch(), jax.random.key(1))
  assert np.isfinite(float(m["train_loss"]))


def _cli_env():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_NUM_CPU_DEVICES="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGINS), env.get("PYTHONPATH")])))
  return env


def test_a_plugin_method_trains_through_the_command_line_with_its_args_recorded(tmp_path):
  wd = tmp_path / "wd"
  argv = [sys.executable, "-c", MOCK_DATA_CLI, "fastadv_jax.main",
          f"--config={ROOT}/configs/fashion_mnist.py:my_preset,eps=16", f"--workdir={wd}"
          ] + TINY_CLI + ["--config.plugins=my_method", "--config.method_args.my_method.alpha=2"]
  proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env=_cli_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = json.loads((wd / "config.json").read_text())
  assert config["method"] == "my_method" and config["plugins"] == "my_method"
  # The preset's value and the command line's both reached the run's record.
  assert config["method_args"]["my_method"] == {"alpha": 2.0, "shrink": 0.25}
  results = json.loads((wd / "results.json").read_text())
  assert results["method_args"] == {"alpha": 2.0, "shrink": 0.25}
  assert 0.0 <= results["pgd_acc"] <= results["clean_acc"] <= 1.0
  # A bad value of the plugin's own field is one line naming it, before any work.
  bad = argv[:-1] + ["--config.method_args.my_method.shrink=2"]
  bad[bad.index(f"--workdir={wd}")] = f"--workdir={tmp_path / 'bad'}"
  proc = subprocess.run(bad, capture_output=True, text=True, cwd=ROOT, timeout=300,
                        env=_cli_env())
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.method_args.my_method.shrink: must be in (0, 1], got 2.0")
  assert not (tmp_path / "bad").exists()


def test_an_unimportable_plugin_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "fastadv_jax.main", f"--config={ROOT}/configs/default.py",
       f"--workdir={tmp_path}", "--config.plugins=no_such_module_here"],
      capture_output=True, text=True, cwd=ROOT, timeout=300, env=_cli_env())
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: --config.plugins: plugin 'no_such_module_here' could not "
                              "be imported: ModuleNotFoundError")


def test_the_benchmark_and_the_sweep_take_a_plugin_method_and_model(tmp_path):
  env = _cli_env()
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "fastadv_jax.benchmark", "--plugins=my_method,my_model",
       "--models=my_model",
       "--methods=fgsm,my_preset", "--batches=16", "--windows=1", "--steps=1",
       "--min_window_s=0", "--width=4", f"--out={out}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"fgsm", "my_preset"} and rows["my_preset"]["images_per_s"] > 0
  assert {r["model"] for r in rows.values()} == {"my_model"}  # a plugin model, timed too
  proc = subprocess.run(
      [sys.executable, str(ROOT / "experiments" / "sweep.py"), "--config=configs/fashion_mnist.py",
       "--methods=all", "--eps=16", f"--root={tmp_path / 'sweep'}", "--plugins=my_method",
       "--dry_run"], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  commands = [line for line in proc.stdout.splitlines() if "fastadv_jax.main" in line]
  mine = [line for line in commands if ":my_preset," in line]
  assert len(mine) == 1 and "--config.plugins=my_method" in mine[0]
  assert any(":gradalign," in line for line in commands)  # the built-in presets with it


def _readme_block(heading: str) -> dict:
  """Runs the first python block after `heading` in the README, as a reader would paste it;
  returns its variables."""
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index(heading):]
  code = section[section.index("```python\n") + len("```python\n"):]
  code = code[:code.index("```")]
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  return scope


def test_the_readme_own_code_example_runs_and_trains():
  scope = _readme_block("### GradAlign in your own training loop")
  loss, reg = scope["loss"], scope["reg"]
  assert np.isfinite(float(loss)) and 0.0 < float(reg) <= 2 * 0.2


def test_the_readme_autoattack_example_breaks_only_breakable_points():
  """The README's AutoAttack block on its linear model: the exact worst case of a linear model
  over the eps-ball and the [0, 1] box is a per-coordinate choice, so a point reported broken
  must have a target class whose exact worst-case margin is <= 0, and every adversarial example
  stays in the ball and the box."""
  scope = _readme_block("### AutoAttack on your own model")
  result, images, labels = scope["result"], scope["images"], scope["labels"]
  w, eps = np.asarray(scope["w"], np.float64), 0.02
  x = images.reshape(len(images), -1).astype(np.float64)
  worst = np.full(len(x), np.inf)
  for j in range(w.shape[1]):
    d = w[:, labels] - w[:, [j]]                          # (784, n): margin direction vs class j
    low, high = np.maximum(x - eps, 0.0) - x, np.minimum(x + eps, 1.0) - x
    margin = np.sum(d.T * x + np.minimum(d.T * low, d.T * high), axis=1)
    worst = np.where(labels == j, worst, np.minimum(worst, margin))
  assert np.all(worst[~result.robust] <= 1e-4)           # nothing unbreakable is broken
  assert 0.0 < result.accuracy < 1.0 and result.accuracy == pytest.approx(np.mean(result.robust))
  delta = np.asarray(result.x_adv) - images
  assert np.all(np.abs(delta) <= eps + 1e-6) and np.all((result.x_adv >= 0) & (result.x_adv <= 1))


def test_installed_plugins_are_loaded_from_their_entry_point_group(monkeypatch):
  """A package's `fastadv_jax.plugins` entry point (a module or a registration function) is
  imported once per process; a broken one is a PluginError naming it."""
  from fastadv_jax.runtime import plugins  # pylint: disable=import-outside-toplevel
  calls = []

  class FakeEntryPoint:
    def __init__(self, name, value, obj):
      self.name, self.value, self._obj = name, value, obj
      self.dist = types.SimpleNamespace(name="toy-pkg", version="1.2")

    def load(self):
      if isinstance(self._obj, Exception):
        raise self._obj
      return self._obj

  def register_toy():
    calls.append("registered")
    methods.register(Method("toy_entry_point", "from an entry point", _toy_perturb, _ToyArgs))

  groups = []
  monkeypatch.setattr(plugins.importlib.metadata, "entry_points",
                      lambda group: groups.append(group) or [
                          FakeEntryPoint("toy", "toy_pkg:register_toy", register_toy)])
  monkeypatch.setattr(plugins, "_loaded_entry_points", False)
  monkeypatch.setattr(plugins, "_entry_point_sources", {})
  assert plugins.load_entry_points() == ("toy_pkg:register_toy",)
  assert plugins.load_entry_points() == ()  # once per process
  assert groups == ["fastadv_jax.plugins"] and calls == ["registered"]
  assert "toy_entry_point" in methods.names()
  # what a run's config.json records about it (workdir.record_config), with a named module
  assert plugins.sources("json") == {
      "toy_pkg:register_toy": {"entry_point": "toy", "package": "toy-pkg", "version": "1.2"},
      "json": {"package": None, "file": json.__file__}}
  monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group: [
      FakeEntryPoint("broken", "broken_pkg.mod", ImportError("no module named broken_pkg"))])
  monkeypatch.setattr(plugins, "_loaded_entry_points", False)
  with pytest.raises(plugins.PluginError, match="installed plugin 'broken' .broken_pkg.mod."):
    plugins.load_entry_points()


def test_plugins_named_on_the_command_line_are_found_before_flags_are_parsed():
  from fastadv_jax.runtime import plugins  # pylint: disable=import-outside-toplevel
  argv = ["prog", "--config=c.py", "--config.plugins=a.b, c", "--config.plugins", "d"]
  assert plugins.from_argv(argv) == "d"  # the last one wins, as absl's flags
  assert plugins.parse(plugins.from_argv(argv[:3])) == ("a.b", "c")
  assert plugins.from_argv(["prog"]) == ""
