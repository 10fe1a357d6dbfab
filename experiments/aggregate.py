"""Aggregate a sweep's results.json files into a table (mean +- std over seeds).

  python experiments/aggregate.py --root=runs/fmnist [--out=runs/fmnist/summary]

Run folders are named <method>_eps<e>_s<seed> (experiments/sweep.py). Prints a Markdown table
(clean and PGD-50-10 accuracy of the last and of the early-stopped model, how many seeds
overfit catastrophically by the library's current flag replayed on each run's diagnostics, the
per-step cost measured inside the runs, train time) and writes <out>.json and <out>.md.
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


def replay_overfitting_flag(workdir: str) -> dict:
  """The catastrophic-overfitting flag recomputed from the run's stored diagnostics with the
  library's current rule (so runs made before a rule change are judged alike)."""
  from fastadv_jax.training import metric_writers, monitoring  # pylint: disable=import-outside-toplevel
  from fastadv_jax.training import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  config = workdir_lib.read_config(workdir)
  if config is None or not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return {}  # not a full run folder: keep the flag results.json has
  record = monitoring.RunRecord()
  for row in metric_writers.read_metrics(workdir):
    if "test_pgd_acc" in row:
      monitoring.track_catastrophic_overfitting(record, config, row["step"], row["test_pgd_acc"],
                                                row["test_alignment"], row["test_fgsm_acc"])
  return {"catastrophic_overfitting": record.co_step >= 0,
          "catastrophic_overfitting_signature": record.co_signature or None}


def collect(root: str) -> dict[tuple[str, float], list[dict]]:
  groups = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(root, "*", "results.json"))):
    m = NAME.match(os.path.basename(os.path.dirname(path)))
    if not m:
      continue
    from fastadv_jax.training import workdir  # pylint: disable=import-outside-toplevel
    try:
      r = workdir.read_results(path)  # checked: a number edited by hand is never aggregated
    except workdir.WorkdirError as e:
      raise SystemExit(f"error: {e}") from None
    r["seed"] = int(m["seed"])
    r.update(replay_overfitting_flag(os.path.dirname(path)))
    groups[(m["method"], float(m["eps"]))].append(r)
  return dict(groups)


def summarize(groups: dict[tuple[str, float], list[dict]]) -> list[dict]:
  rows = []
  for (method, eps), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
    def stat(get):
      v = np.array([get(r) for r in runs], float) * 100
      return float(v.mean()), float(v.std())
    row = {"method": method, "eps": eps, "seeds": len(runs),
           "clean": stat(lambda r: r["clean_acc"]), "pgd": stat(lambda r: r["pgd_acc"]),
           "pgd_by_seed": [round(100 * r["pgd_acc"], 1) for r in sorted(runs,
                                                                       key=lambda r: r["seed"])],
           "co": sum(bool(r.get("catastrophic_overfitting")) for r in runs),
           "train_time_s": float(np.mean([r["train_time_s"] for r in runs])),
           "step_ms": float(np.mean([r.get("step_time_s", np.nan) for r in runs])) * 1e3,
           "co_signatures": sorted({r.get("catastrophic_overfitting_signature") or "" for r in runs
                                    } - {""}),
           "n_eval": runs[0]["n_eval"], "pgd_steps": runs[0]["pgd_steps"],
           "pgd_restarts": runs[0]["pgd_restarts"]}
    if all("best" in r for r in runs):
      row["best_clean"] = stat(lambda r: r["best"]["clean_acc"])
      row["best_pgd"] = stat(lambda r: r["best"]["pgd_acc"])
    rows.append(row)
  fgsm_ms = {r["eps"]: r["step_ms"] for r in rows if r["method"] == "fgsm"}
  for r in rows:  # per-step cost relative to FGSM at the same eps, from the runs themselves
    r["cost_vs_fgsm"] = r["step_ms"] / fgsm_ms[r["eps"]] if r["eps"] in fgsm_ms else float("nan")
  return rows


def markdown(rows: list[dict]) -> str:
  fmt = lambda ms: f"{ms[0]:.1f} ± {ms[1]:.1f}"  # noqa: E731
  lines = ["| method | eps (/255) | seeds | clean | PGD | PGD by seed | early-stopped clean "
           "| early-stopped PGD | CO runs | step (ms) | cost vs FGSM | train time (s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['eps']:g} | {r['seeds']} | {fmt(r['clean'])} | "
                 f"{fmt(r['pgd'])} | {' / '.join(f'{v:g}' for v in r['pgd_by_seed'])} | "
                 f"{fmt(r['best_clean']) if 'best_clean' in r else '-'} | "
                 f"{fmt(r['best_pgd']) if 'best_pgd' in r else '-'} | {r['co']}/{r['seeds']}"
                 f"{' (' + ', '.join(r['co_signatures']) + ')' if r['co_signatures'] else ''} | "
                 f"{r['step_ms']:.1f} | {r['cost_vs_fgsm']:.2f}x | {r['train_time_s']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--root", required=True)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  rows = summarize(collect(args.root))
  if not rows:
    raise SystemExit(f"no <method>_eps<e>_s<seed>/results.json under {args.root}")
  table = markdown(rows)
  print(table)
  out = args.out or os.path.join(args.root, "summary")
  with open(out + ".json", "w") as f:
    json.dump(rows, f, indent=2)
  with open(out + ".md", "w") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
