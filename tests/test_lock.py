"""The locked environment (requirements/, scripts/lock.sh): the README's measured numbers name
the versions the lock installs, the lock pins every package with hashes, and no script or test
depends on a path of one particular machine."""
import pathlib
import re

from conftest import ROOT
from fastadv_jax.runtime import distributed

LOCK = ROOT / "requirements" / "cpu.txt"


def _locked() -> dict[str, str]:
  return dict(re.findall(r"^([a-z0-9_.-]+)==(\S+)", LOCK.read_text(), re.M))


def test_every_locked_package_has_an_exact_version_and_hashes():
  text = LOCK.read_text()
  entries = re.split(r"\n(?=[a-z0-9])", text.split("\n", 1)[1].strip())
  assert len(entries) > 50
  for entry in entries:
    if entry.startswith("#"):
      continue
    assert re.match(r"^[a-z0-9_.-]+==\S+", entry), entry
    assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_the_readme_states_the_locked_versions_beside_its_numbers():
  locked = _locked()
  block = re.search(r"<!-- measured:default -->(.*?)<!-- /measured:default -->",
                    (ROOT / "README.md").read_text(), re.S).group(1)
  for package in ("jax", "jaxlib", "flax", "optax"):
    assert f"{package} {locked[package]}" in block, package
  pins = dict(re.findall(r"^([a-z0-9_.-]+)==(\S+)", (ROOT / "requirements" / "pins.txt")
                         .read_text(), re.M))
  assert pins and all(locked[p] == v for p, v in pins.items())


def test_the_lock_avoids_the_jaxlib_whose_multiprocess_runs_hang():
  assert _locked()["jaxlib"] not in distributed.BROKEN_MULTIPROCESS_JAXLIB
  setup = (ROOT / "setup.py").read_text()
  for version in distributed.BROKEN_MULTIPROCESS_JAXLIB:
    assert f'"jaxlib>=0.10,!={version}"' in setup


def test_no_script_or_test_names_a_path_of_one_machine():
  for path in list((ROOT / "scripts").iterdir()) + list((ROOT / "tests").rglob("*.py")):
    if path.is_file() and path != pathlib.Path(__file__):
      assert "/opt/" not in path.read_text(), path
