"""Every code block of the README and docs/ is run or checked, so the docs cannot rot unseen.

- Python blocks run, on a tiny model given to them as the names the prose says they take
  (`model`, `variables`, `images`, `labels`, ...); each block's result is checked.
- Command blocks (bash) are checked without running the trainings they start: every
  `python -m fastadv_jax.<command>` uses only flags that command defines, every `--config=` file
  and its argument load, every `--config.<field>` override names a field of that config, and
  every script or file they name exists.
The README's own two python blocks are run with stronger checks in test_functional.py.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


def _blocks(lang: str) -> list[tuple[str, str]]:
  """(file name, code) of every fenced block in `lang` ('' for unlabelled ones)."""
  out = []
  for path in DOCS:
    for m in FENCE.finditer(path.read_text()):
      if m.group(1) == lang:
        out.append((path.relative_to(ROOT).as_posix(), m.group(2)))
  return out


def _commands() -> list[tuple[str, list[str]]]:
  """(file, argv) of every command line in the docs' bash blocks: continuation lines joined,
  comments, `for`/`done` wrappers, `&` and leading VAR=value assignments dropped."""
  out = []
  for where, code in _blocks("bash"):
    joined = re.sub(r"\\\n\s*", " ", code)
    for line in joined.splitlines():
      line = line.split(" #")[0].strip().rstrip("&").strip()
      if not line or line.startswith(("#", "for ", "done", "do ")):
        continue
      argv = shlex.split(line)
      while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        argv = argv[1:]
      if argv:
        out.append((where, argv))
  return out


@functools.lru_cache(maxsize=None)
def _absl_flags(command: str) -> frozenset[str]:
  """The flags `fastadv_jax.<command>` declares (its key flags), read in a fresh process: a
  command line imported here would leave its required flags in this process's absl FLAGS, and a
  later test that runs a command line in-process would fail their validation."""
  code = ("import importlib, json, sys; from absl import flags; m = importlib.import_module("
          "'fastadv_jax.' + sys.argv[1]); print(json.dumps(sorted(f.name for f in "
          "flags.FLAGS.get_key_flags_for_module(m))))")
  out = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True,
                       cwd=ROOT, check=True, timeout=300).stdout
  return frozenset(json.loads(out.strip().splitlines()[-1]))


def _benchmark_flags() -> set[str]:
  from fastadv_jax import benchmark  # pylint: disable=import-outside-toplevel
  return {s.lstrip("-") for s in benchmark._parser()._option_string_actions}  # pylint: disable=protected-access


def _check_config(where: str, spec: str, overrides: list[str]) -> None:
  """`--config=file[:arg]` loads, and each `--config.a.b` override names one of its fields."""
  path, _, arg = spec.partition(":")
  assert (ROOT / path).is_file(), f"{where}: no config file {path}"
  module = importlib.import_module("fastadv_jax.configs." + path.rsplit("/", 1)[-1][:-3])
  config = module.get_config(arg) if arg else module.get_config()
  for field in overrides:
    node = config
    for part in field.split("."):
      assert part in node, f"{where}: --config.{field}: {spec} has no field {part!r}"
      node = node[part]


def test_the_docs_have_code_to_check():
  assert len(_commands()) >= 20 and len(_blocks("python")) >= 5


@pytest.mark.parametrize("where,argv", _commands(), ids=lambda v: v if isinstance(v, str) else
                         " ".join(v)[:60])
def test_every_command_line_in_the_docs_is_current(where, argv):
  if argv[0] in ("bash", "sh"):
    assert (ROOT / argv[1]).is_file(), f"{where}: no script {argv[1]}"
    return
  if not argv[0].endswith("python"):
    return  # pip, gcloud, cat, ...: not this project's to check
  if argv[1] != "-m":
    assert (ROOT / argv[1]).is_file(), f"{where}: no file {argv[1]}"
    return
  command = argv[2].removeprefix("fastadv_jax.")
  known = _benchmark_flags() if command == "benchmark" else _absl_flags(command)
  names = [a[2:].split("=")[0] for a in argv[3:] if a.startswith("--")]
  overrides = [n[len("config."):] for n in names if n.startswith("config.")]
  unknown = [n for n in names if not n.startswith("config.") and n not in known
             and not (n.startswith("no") and n[2:] in known)]
  assert not unknown, f"{where}: {argv[2]} has no flag --{unknown[0]}"
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    assert not overrides, f"{where}: --config.{overrides[0]} without a --config file"
    return
  plugins = [a.split("=", 1)[1] for a in argv if a.startswith("--config.plugins=")]
  with _docs_plugins(plugins):
    _check_config(where, spec, overrides)


@contextlib.contextmanager
def _docs_plugins(plugins: list[str]):
  """The docs' example plugin, `my_pkg.my_method`, is docs/methods.md's python block: it is
  registered (the command lines import --config.plugins before they read the config) while the
  command is checked."""
  from fastadv_jax import methods  # pylint: disable=import-outside-toplevel
  unknown = [p for p in plugins if p != "my_pkg.my_method"]
  assert not unknown, f"plugin {unknown[0]} is not the docs' example plugin"
  if not plugins:
    yield
    return
  _run_block("docs/methods.md", "my_method", {})
  try:
    yield
  finally:
    methods.unregister("my_method")


# ---------------------------------------------------------------------------------------------
# The python blocks, each with the names its prose gives it.


def _linear_model():
  """A 5-class linear model on 4x4x1 images and 12 points it classifies correctly."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(x.reshape(x.shape[0], -1))

  model = Linear()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
  images = np.random.default_rng(0).uniform(size=(12, 4, 4, 1)).astype(np.float32)
  labels = np.asarray(jnp.argmax(model.apply(variables, images), -1)).astype(np.int32)
  return model, variables, images, labels


def _run_block(where: str, needle: str, scope: dict) -> dict:
  block = next(code for w, code in _blocks("python") if w == where and needle in code)
  exec(compile(block, where, "exec"), scope)  # pylint: disable=exec-used
  return scope


def test_the_evaluation_guides_autoattack_block(monkeypatch):
  """AutoAttack on your own model, deterministic and randomised. The block's settings are the
  reference's (hundreds of steps); a linear model answers alike with a few, so the test lowers
  them through AutoAttack's defaults and checks the block's results."""
  from fastadv_jax import autoattack  # pylint: disable=import-outside-toplevel
  model, variables, images, labels = _linear_model()
  real = autoattack.evaluate
  monkeypatch.setattr(autoattack, "evaluate", lambda *a, **k: real(
      *a, **{"apgd_steps": 3, "fab_steps": 3, "square_queries": 20, "progress": False,
             "eot_iter": 2, "draws": 2, **k}))
  noisy_fn = lambda x, key: model.apply(variables, x) + 0.01 * jax.random.normal(  # noqa: E731
      key, (x.shape[0], 5))
  scope = _run_block("docs/evaluation.md", "randomized=True", dict(
      model=model, variables=variables, images=images, labels=labels, noisy_fn=noisy_fn))
  result = scope["result"]  # the randomised model's
  assert result.draws == 2 and 0.0 <= result.accuracy <= result.clean_accuracy <= 1.0
  assert result.attacks == autoattack.VERSIONS["rand"]


def test_the_evaluation_guides_own_attack_block(monkeypatch):
  """A component registered from outside runs after APGD-CE: an FGSM step at eps 8/255 on a
  linear model, whose verdicts are its own (it is listed, and the points it reports broken are
  misclassified at its adversarial example)."""
  from fastadv_jax import autoattack  # pylint: disable=import-outside-toplevel
  model, variables, images, labels = _linear_model()
  real = autoattack.evaluate
  monkeypatch.setattr(autoattack, "evaluate", lambda *a, **k: real(
      *a, **{"apgd_steps": 3, "progress": False, **k}))
  logits_fn = lambda x: model.apply(variables, x)  # noqa: E731
  try:
    result = _run_block("docs/evaluation.md", "autoattack.register", dict(
        logits_fn=logits_fn, images=images, labels=labels))["result"]
  finally:
    autoattack.unregister("fgsm")
  assert result.attacks == ("apgd-ce", "fgsm")
  broken = ~result.robust
  assert np.all(np.argmax(logits_fn(result.x_adv[broken]), -1) != labels[broken])
  assert np.all(np.abs(result.x_adv - images) <= 8 / 255 + 1e-6)


def test_the_methods_guides_plugin_block():
  """The plugin method of docs/methods.md registers with its args record, which refuses a bad
  value naming the field, and its preset."""
  from fastadv_jax import methods, registry  # pylint: disable=import-outside-toplevel
  try:
    scope = _run_block("docs/methods.md", "my_method", {})
    method = methods.get("my_method")
    assert method.args is scope["MyArgs"] and method.default_init == "uniform"
    assert method.presets == {"my_method": {"alpha": 1.0}}
    with pytest.raises(registry.ArgError, match="alpha"):
      scope["MyArgs"](alpha=-1.0)
  finally:
    methods.unregister("my_method")


def test_the_method_records_table_lists_every_field_and_who_uses_it():
  """docs/methods.md's table of the Method record: one row per field, and its last column names
  exactly the built-in methods that set the field away from its default."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from fastadv_jax import methods  # pylint: disable=import-outside-toplevel
  from fastadv_jax.methods.base import Method  # pylint: disable=import-outside-toplevel
  text = (ROOT / "docs" / "methods.md").read_text()
  rows = {}
  for line in text[text.index("| field | kind |"):].splitlines()[2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows[cells[0].strip("`")] = cells[-1]
  fields = dataclasses.fields(Method)
  assert sorted(rows) == sorted(f.name for f in fields)
  builtin = [n for n in methods.names() if methods.get(n).perturb.__module__.startswith(
      "fastadv_jax.")]
  blank = Method("blank", "", lambda inp: None)
  for f in fields:
    users = [n for n in builtin
             if getattr(methods.get(n), f.name) is not getattr(blank, f.name)
             and getattr(methods.get(n), f.name) != getattr(blank, f.name)]
    if rows[f.name] == "all":
      want = builtin
    elif rows[f.name].startswith("all but "):
      want = [n for n in builtin if n not in re.findall(r"`(\w+)`", rows[f.name])]
    else:
      want = re.findall(r"`(\w+)`", rows[f.name])
    if f.name in ("name", "summary", "perturb"):
      continue  # required: every record has its own
    assert sorted(users) == sorted(want), (f.name, users)
