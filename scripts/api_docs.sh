#!/usr/bin/env bash
# Builds the API reference (HTML generated from the docstrings by pdoc) into build/api/, or into
# the folder given as the first argument. Set-up first (idempotent), as scripts/test.sh.
# Fails when a module cannot be imported or pdoc reports any problem (a warning) while building.
# Left out: fastadv_jax.interop.torch_models, which imports PyTorch at the top (it is written to be
# copied, self-contained, next to exported weights as model.py); .venv has no PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-build/api}
rm -rf "$out"
JAX_PLATFORMS=cpu exec .venv/bin/python - "$out" <<'EOF'
import importlib
import pathlib
import pkgutil
import re
import sys
import warnings

import pdoc
import pdoc.extract
import pdoc.render

import fastadv_jax

out = pathlib.Path(sys.argv[1])
excluded = {"fastadv_jax.interop.torch_models"}


def _raise(name):
  raise RuntimeError(f"cannot import package {name}")


# Every module by name: pdoc alone would skip the submodules that a package's __all__ leaves
# out (fastadv_jax.methods lists its records, not its method modules).
modules = ["fastadv_jax"] + [
    m.name for m in pkgutil.walk_packages(fastadv_jax.__path__, "fastadv_jax.", onerror=_raise)
    if not any(part.startswith("_") for part in m.name.split("."))]
# fastadv_jax.configs is the repository's configs/ folder, installed under the package
# (setup.py's package_dir): pdoc finds it from the package or not, depending on the install.
modules.append("fastadv_jax.configs")
specs = ["fastadv_jax"] + [f"!{m}" for m in sorted(excluded)]
found = set(pdoc.extract.walk_specs(specs))
missing = [m for m in modules if m not in found and m not in excluded]
specs[1:1] = [m for m in missing if not any(m.startswith(p + ".") for p in missing)]
pdoc.render.configure(docformat="markdown", footer_text="fastadv-jax API reference")
pdoc_dir = pathlib.Path(pdoc.__file__).resolve().parent
# The command lines' shared flags (workdir, weights, config) are defined once, in
# fastadv_jax/cli/shared_flags.py, so importing them all here is fine; fastadv_jax.interop's
# __all__ leaves torch_models out, so the package's page does not import it either.
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  pdoc.pdoc(*specs, output_directory=out)
# Only pdoc's own warnings count (a module that cannot be imported, unparsable source, a bad
# docstring include, ...); warnings that the imported libraries raise are not the reference's
# problem. Annotations that pdoc cannot resolve (string annotations of NamedTuple constructors,
# flax's recursive ArrayTree) are printed as notes: the page shows them as written.
# A name in __all__ that a module provides through a module-level __getattr__ (PEP 562; e.g.
# autoattack's ATTACKS, derived from a live registry) has no static value for pdoc to show: it
# is listed as a note too.
def dynamic_attribute(message: str) -> bool:
  m = re.match(r"Found '([^']+)' in ([\w.]+)\.__all__, but it does not resolve", message)
  if not m:
    return False
  module = importlib.import_module(m.group(2))
  return "__getattr__" in vars(module) and hasattr(module, m.group(1))


own = [w for w in caught if pathlib.Path(w.filename).resolve().is_relative_to(pdoc_dir)]
notes = [w for w in own if str(w.message).startswith("Error parsing type annotation")]
dynamic = [w for w in own if dynamic_attribute(str(w.message))]
problems = [w for w in own if w not in notes and w not in dynamic]
if notes:
  where = sorted({str(w.message).split(" for ", 1)[-1].split(". Import")[0] for w in notes})
  print(f"[api_docs] note: {len(notes)} annotation(s) left as written in: {', '.join(where)}",
        file=sys.stderr)
if dynamic:
  names = sorted({str(w.message).split(" in ", 1)[1].split(", but")[0].replace(".__all__", "")
                  + "." + str(w.message).split("'")[1] for w in dynamic})
  print(f"[api_docs] note: not shown (module __getattr__): {', '.join(names)}", file=sys.stderr)
for w in problems:
  print(f"[api_docs] pdoc: {w.message}", file=sys.stderr)
pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
if problems:
  sys.exit(f"[api_docs] error: {len(problems)} problem(s) while building the API reference")
for required in ("fastadv_jax.html", "fastadv_jax/gradalign.html"):
  if required not in pages:
    sys.exit(f"[api_docs] error: no page {required} in {out}")
print(f"[api_docs] {len(pages)} pages in {out}/ (open {out}/index.html)")
EOF
