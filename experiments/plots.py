"""Plots as PNG: robust accuracy vs eps per method (paper Fig. 1), and one run's dynamics.

  python experiments/plots.py eps --root=runs/fmnist --out=robust_vs_eps.png
  python experiments/plots.py dynamics --workdir=runs/fmnist/fgsm_eps64_s0 --out=dynamics.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aggregate  # noqa: E402


def plot_robust_vs_eps(root: str, out: str, key: str = "pgd") -> None:
  rows = aggregate.summarize(aggregate.collect(root))
  methods = sorted({r["method"] for r in rows})
  fig, ax = plt.subplots(figsize=(7.5 if len(methods) > 6 else 6, 4))
  colors = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
  for i, method in enumerate(methods):  # distinct colour, marker and dash for many methods
    rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["eps"])
    ax.errorbar([r["eps"] + 0.4 * (i - len(methods) / 2) for r in rs],  # small x offsets
                [r[key][0] for r in rs], yerr=[r[key][1] for r in rs], color=colors(i),
                marker="osD^v<>ph*XP"[i % 12], linestyle=("-", "--", ":")[i % 3], capsize=3,
                label=method)
  n = rows[0]
  ax.set_xlabel("eps (x/255)")
  ax.set_ylabel(f"{'PGD' if key == 'pgd' else key} accuracy (%)")
  ax.set_title(f"PGD-{n['pgd_steps']}-{n['pgd_restarts']} accuracy on {n['n_eval']} test points")
  ax.grid(alpha=0.3)
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def plot_dynamics(workdir: str, out: str) -> None:
  from fastadv_jax.training.metric_writers import read_metrics
  recs = [r for r in read_metrics(workdir) if "test_pgd_acc" in r]
  steps = [r["step"] for r in recs]
  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  for key, label in (("test_clean_acc", "clean"), ("test_fgsm_acc", "FGSM"),
                     ("test_pgd_acc", "PGD-10"), ("train_eval_pgd_acc", "train PGD-10")):
    ax1.plot(steps, [100 * r[key] for r in recs], label=label)
  ax1.set_ylabel("accuracy (%)")
  ax1.legend()
  ax2.plot(steps, [r["test_alignment"] for r in recs], label="cos(grad l(x), grad l(x+eta))")
  ax2.plot(steps, [r["test_cos_fgsm_pgd"] for r in recs], label="cos(delta_FGSM, delta_PGD)")
  ax2.set_ylabel("cosine")
  ax2.set_xlabel("iteration")
  ax2.legend()
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    with open(results) as f:
      co = json.load(f).get("catastrophic_overfitting_step")
    if co:
      for ax in (ax1, ax2):
        ax.axvline(co, color="red", ls="--", alpha=0.7)
      ax1.text(co, 50, " catastrophic\n overfitting", color="red")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
  ax1.set_title(os.path.basename(os.path.normpath(workdir)))
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("kind", choices=["eps", "dynamics"])
  p.add_argument("--root", default="")
  p.add_argument("--workdir", default="")
  p.add_argument("--out", required=True)
  p.add_argument("--key", default="pgd", help="eps plot: pgd | clean | best_pgd | best_clean")
  args = p.parse_args(argv)
  if args.kind == "eps":
    plot_robust_vs_eps(args.root, args.out, args.key)
  else:
    plot_dynamics(args.workdir, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
