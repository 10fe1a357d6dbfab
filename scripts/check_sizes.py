"""The package's pieces stay small: no class over 150 lines, no function over 60.

  .venv/bin/python scripts/check_sizes.py          # CI: fails on a new or grown oversized piece
  .venv/bin/python scripts/check_sizes.py --list   # every piece over the limits, largest first

Lines are counted from the `def` / `class` line to the last line of the body, docstrings and
comments included. None is over today. A piece that must be (a table of data) is listed in
OVER_THE_LIMIT with its size and the reason: it may shrink but not grow.
"""
from __future__ import annotations

import argparse
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASS_LINES, FUNCTION_LINES = 150, 60

# qualified name -> its size when it was listed, with a comment saying why it may be.
OVER_THE_LIMIT: dict[str, int] = {}


def pieces() -> list[tuple[str, str, int]]:
  """(kind, qualified name, lines) of every class and function in fastadv_jax/."""
  out = []
  for path in sorted((ROOT / "fastadv_jax").rglob("*.py")):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    tree = ast.parse(path.read_text())

    def visit(node: ast.AST, prefix: str) -> None:
      for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          name = f"{prefix}.{child.name}"
          kind = "class" if isinstance(child, ast.ClassDef) else "function"
          out.append((kind, name, child.end_lineno - child.lineno + 1))
          visit(child, name)
    visit(tree, module)
  return out


def over_the_limit() -> dict[str, int]:
  return {name: n for kind, name, n in pieces()
          if n > (CLASS_LINES if kind == "class" else FUNCTION_LINES)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--list", action="store_true", help="print every piece over the limits")
  args = parser.parse_args(argv)
  over = over_the_limit()
  if args.list:
    for name, n in sorted(over.items(), key=lambda kv: -kv[1]):
      print(f"{n:5d}  {name}")
    return 0
  problems = [f"{name}: {n} lines (the limit is {CLASS_LINES} for a class, {FUNCTION_LINES} "
              "for a function)" for name, n in over.items() if name not in OVER_THE_LIMIT]
  problems += [f"{name}: {n} lines, more than the {OVER_THE_LIMIT[name]} it was listed with"
               for name, n in over.items() if name in OVER_THE_LIMIT and n > OVER_THE_LIMIT[name]]
  for problem in problems:
    print(f"[sizes] {problem}", file=sys.stderr)
  print(f"[sizes] {len(over)} pieces over the limits, {len(OVER_THE_LIMIT)} listed "
        f"(scripts/check_sizes.py); {len(problems)} new or grown")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
