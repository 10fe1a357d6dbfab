"""The table of the protocol study (experiments/fmnist_protocol_study.sh): per method, mean ±
std (sample std, ddof 1) over seeds of clean, PGD-50-10 and AutoAttack accuracy for the selected weights (the
protocol's result), the last averaged weights and the last raw weights (no averaging).

  python experiments/protocol_table.py --root=runs/protocol_cnn [--out=runs/protocol_cnn/table]

Reads each run's results.json (clean and PGD-50-10 of the three kinds of weights; which weights
the validation chose) and the AutoAttack files that `fastadv_jax.evaluate --weights=selected|last
--attack=autoattack` wrote beside it. A missing number is left blank, never guessed; the seeds
column counts the runs with each number. Prints Markdown and writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re

import numpy as np

NAME = re.compile(r"^(?P<method>.+)_eps(?P<eps>[0-9.]+)_s(?P<seed>\d+)$")


def autoattack_accuracy(workdir: str, weights: str) -> float | None:
  """The robust accuracy in the run's `evaluate` output for `weights` with AutoAttack standard
  (None if there is none yet)."""
  files = sorted(glob.glob(os.path.join(workdir, f"eval_{weights}_*aa-standard*.json")))
  if not files:
    return None
  with open(files[-1]) as f:
    out = json.load(f)
  return out.get("autoattack_acc")


def run_row(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    r = json.load(f)
  selected, averaged = r.get("selected", {}), r.get("averaged", {})
  return {
      "sel_clean": selected.get("clean_acc"), "sel_pgd": selected.get("pgd_acc"),
      "sel_aa": autoattack_accuracy(workdir, "selected"),
      "sel_averaged": None if not selected else selected.get("weights") == "averaged",
      "avg_clean": averaged.get("clean_acc"), "avg_pgd": averaged.get("pgd_acc"),
      "raw_clean": r.get("clean_acc"), "raw_pgd": r.get("pgd_acc"),
      "raw_aa": autoattack_accuracy(workdir, "last"),
      "step_ms": 1000 * r["step_time_s"] if "step_time_s" in r else None,
  }


def collect(root: str) -> dict[tuple[str, float], list[dict]]:
  groups = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
    workdir = os.path.dirname(path)
    m = NAME.match(os.path.basename(workdir))
    if m:
      groups[(m["method"], float(m["eps"]))].append({"seed": int(m["seed"]), **run_row(workdir)})
  return dict(groups)


def _stat(runs: list[dict], key: str) -> tuple[str, list[float]]:
  vals = [100 * r[key] for r in runs if r[key] is not None]
  if not vals:
    return "", []
  if len(vals) == 1:
    return f"{vals[0]:.1f}", vals
  return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1):.1f}", vals


COLUMNS = [("sel_aa", "selected AA"), ("sel_pgd", "selected PGD"), ("sel_clean", "selected clean"),
           ("avg_pgd", "averaged PGD"), ("avg_clean", "averaged clean"),
           ("raw_aa", "raw AA"), ("raw_pgd", "raw PGD"), ("raw_clean", "raw clean")]


def table(groups: dict[tuple[str, float], list[dict]]) -> tuple[str, list[dict]]:
  """Markdown, sorted by the selected weights' AutoAttack accuracy (best first)."""
  rows = []
  for (method, eps), runs in groups.items():
    row = {"method": method, "eps": eps, "seeds": len(runs),
           "aa_seeds": sum(r["sel_aa"] is not None for r in runs),
           "averaged_chosen": sum(bool(r["sel_averaged"]) for r in runs)}
    for key, _ in COLUMNS:
      row[key], row[key + "_values"] = _stat(runs, key)
    steps = [r["step_ms"] for r in runs if r["step_ms"] is not None]
    row["step_ms"] = float(np.mean(steps)) if steps else None
    rows.append(row)
  rows.sort(key=lambda r: -np.mean(r["sel_aa_values"]) if r["sel_aa_values"] else 1.0)
  fgsm = {r["eps"]: r["step_ms"] for r in rows if r["method"] == "fgsm"}
  head = ["method", "eps (/255)", "runs (with AA)", "averaged chosen"] + [c for _, c in COLUMNS] + [
      "step (ms)", "cost vs FGSM (in-run)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cost = (f"{r['step_ms'] / fgsm[r['eps']]:.2f}x"
            if r["step_ms"] and fgsm.get(r["eps"]) else "")
    cells = [r["method"], f"{r['eps']:g}", f"{r['seeds']} ({r['aa_seeds']})",
             f"{r['averaged_chosen']}/{r['seeds']}"] + [r[k] for k, _ in COLUMNS] + [
                 f"{r['step_ms']:.1f}" if r["step_ms"] else "", cost]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines), rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", required=True)
  p.add_argument("--out", default="")
  args = p.parse_args()
  md, rows = table(collect(args.root))
  print(md)
  out = args.out or os.path.join(args.root, "table")
  with open(out + ".md", "w") as f:
    f.write(md + "\n")
  with open(out + ".json", "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
