"""Writes the README's measured block (between its `<!-- measured:default -->` markers) from a
default run's results.json and the versions installed in this environment; the block says
which lock file and versions gave the numbers. Used by scripts/upgrade.sh:
    .venv/bin/python scripts/readme_measured.py <workdir> README.md"""
import importlib.metadata
import json
import pathlib
import platform
import re
import sys

START, END = "<!-- measured:default -->", "<!-- /measured:default -->"
PACKAGES = ("jax", "jaxlib", "flax", "optax")


def versions() -> str:
  return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in PACKAGES)


def block(results: dict) -> str:
  co = "yes" if results["catastrophic_overfitting"] else "no"
  return (f"{START}\n"
          f"**The default run with the locked versions** (`bash scripts/train.sh` in a fresh "
          f"clone; `requirements/cpu.txt`: {versions()}; Python {platform.python_version()}; "
          f"2-core CPU): {results['iterations']} iterations; `runs/default/results.json`: clean "
          f"accuracy **{100 * results['clean_acc']:.1f} %**, PGD-"
          f"{results['pgd_steps']}-{results['pgd_restarts']} accuracy "
          f"**{100 * results['pgd_acc']:.1f} %** at eps = {results['eps']:g} on the first "
          f"{results['n_eval']} test points; catastrophic overfitting: {co}.\n{END}")


def main(workdir: str, readme: str) -> None:
  results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  path = pathlib.Path(readme)
  text = path.read_text()
  pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
  if not pattern.search(text):
    sys.exit(f"error: {readme} has no {START} ... {END} block")
  path.write_text(pattern.sub(lambda _: block(results), text, count=1))
  print(f"[readme_measured] {readme}: {versions()}")


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  main(sys.argv[1], sys.argv[2])
