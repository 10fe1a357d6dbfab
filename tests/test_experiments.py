"""Sweep planning, aggregation into tables, plots, and a benchmark smoke run."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TORCH_PY, needs_torch

sys.path.insert(0, str(ROOT / "experiments"))
import aggregate  # noqa: E402
import plots  # noqa: E402
import protocol_table  # noqa: E402
import sweep  # noqa: E402


def _fake_run(root, method, eps, seed, clean, pgd, co=False, steps=(200, 400)):
  d = root / f"{method}_eps{eps}_s{seed}"
  d.mkdir(parents=True)
  (d / "results.json").write_text(json.dumps({
      "clean_acc": clean, "pgd_acc": pgd, "n_eval": 500, "pgd_steps": 50, "pgd_restarts": 10,
      "train_time_s": 10.0, "catastrophic_overfitting": co,
      "catastrophic_overfitting_step": 400 if co else None,
      "best": {"clean_acc": clean, "pgd_acc": pgd + 0.1, "iteration": 200}}))
  with open(d / "metrics.jsonl", "w") as f:
    for i, s in enumerate(steps):
      f.write(json.dumps({"step": s, "epoch": s / 468, "test_clean_acc": 0.8,
                          "test_fgsm_acc": 0.5 + 0.2 * i, "test_pgd_acc": 0.4 - 0.35 * i * co,
                          "train_eval_pgd_acc": 0.4, "test_alignment": 0.9 - 0.7 * i * co,
                          "test_cos_fgsm_pgd": 0.8}) + "\n")
  return d


def test_aggregate_mean_std_over_seeds(tmp_path):
  _fake_run(tmp_path, "fgsm", 64, 0, 0.80, 0.10, co=True)
  _fake_run(tmp_path, "fgsm", 64, 1, 0.70, 0.30)
  _fake_run(tmp_path, "gradalign", 64, 0, 0.75, 0.50)
  (tmp_path / "not_a_run").mkdir()
  rows = aggregate.summarize(aggregate.collect(str(tmp_path)))
  fgsm = next(r for r in rows if r["method"] == "fgsm")
  assert fgsm["seeds"] == 2 and fgsm["co"] == 1 and fgsm["eps"] == 64
  assert fgsm["clean"] == pytest.approx((75.0, 5.0)) and fgsm["pgd"] == pytest.approx((20.0, 10.0))
  assert fgsm["best_pgd"] == pytest.approx((30.0, 10.0))
  table = aggregate.markdown(rows)
  assert "| fgsm | 64 | 2 | 75.0 ± 5.0 | 20.0 ± 10.0 |" in table
  aggregate.main([f"--root={tmp_path}"])
  assert (tmp_path / "summary.md").read_text().startswith("| method")


def test_protocol_table_reads_results_and_autoattack_files_and_guesses_nothing(tmp_path):
  for seed, (sel, raw, aa) in enumerate([(0.40, 0.30, 0.20), (0.50, 0.10, None)]):
    d = tmp_path / f"fgsm_pgi_eps48_s{seed}"
    d.mkdir()
    (d / "results.json").write_text(json.dumps({
        "clean_acc": 0.7, "pgd_acc": raw, "step_time_s": 0.01,
        "averaged": {"clean_acc": 0.7, "pgd_acc": 0.35},
        "selected": {"weights": "averaged" if seed else "raw", "clean_acc": 0.75,
                     "pgd_acc": sel}}))
    if aa is not None:  # seed 1's AutoAttack has not run yet
      (d / "eval_selected_eps0.1882_n1000_aa-standard.json").write_text(
          json.dumps({"autoattack_acc": aa}))
  md, rows = protocol_table.table(protocol_table.collect(str(tmp_path)))
  (row,) = rows
  assert (row["seeds"], row["aa_seeds"], row["averaged_chosen"]) == (2, 1, 1)
  assert row["sel_aa"] == "20.0" and row["raw_aa"] == ""  # one value: no spread; none: blank
  assert row["sel_pgd_values"] == pytest.approx([40.0, 50.0])
  assert row["sel_pgd"] == "45.0 ± 7.1"  # sample std (ddof 1)
  assert "| fgsm_pgi | 48 | 2 (1) | 1/2 | 20.0 | 45.0 ± 7.1 |" in md


def test_plots_are_written(tmp_path):
  for eps, pgd in ((16, 0.6), (64, 0.1)):
    _fake_run(tmp_path, "fgsm", eps, 0, 0.8, pgd, co=eps == 64)
    _fake_run(tmp_path, "gradalign", eps, 0, 0.8, pgd + 0.15)  # robust never above clean
  plots.main(["eps", f"--root={tmp_path}", f"--out={tmp_path}/eps.png"])
  plots.main(["dynamics", f"--workdir={tmp_path}/fgsm_eps64_s0", f"--out={tmp_path}/dyn.png"])
  for name in ("eps.png", "dyn.png"):
    data = (tmp_path / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_sweep_plans_the_grid_and_skips_finished_runs(tmp_path, capsys):
  _fake_run(tmp_path, "fgsm", 8, 0, 0.8, 0.4)  # finished
  args = ["--config=configs/cifar10.py", "--methods=fgsm,gradalign", "--eps=8,16",
          "--seeds=0,1", f"--root={tmp_path}", "--dry_run"]
  assert sweep.main(args) == 0
  out = capsys.readouterr().out
  assert out.startswith("7 run(s) to do")
  assert "--config=configs/cifar10.py:gradalign,eps=16,seed=1" in out
  assert f"--workdir={tmp_path}/fgsm_eps8_s0" not in out
  assert sweep.main(args + ["--shard=1/2"]) == 0
  assert capsys.readouterr().out.startswith("4 run(s) to do")


def test_benchmark_smoke(tmp_path):
  from fastadv_jax import benchmark
  out = tmp_path / "bench.json"
  benchmark.main(["--models=small_cnn", "--methods=fgsm,gradalign", "--batches=8",
                  "--windows=1", "--steps=1", "--min_window_s=0", "--width=2", f"--out={out}",
                  "--eval_points=8", "--passes"])
  result = json.loads(out.read_text())
  rows = {r["method"]: r for r in result["rows"]}
  assert rows["fgsm"]["cost_vs_fgsm"] == 1.0
  # --passes adds plain training and sets every row beside the cost its passes imply; FGSM's
  # clean gradient is GradAlign's g1, read off the traced attack.
  assert list(rows) == ["standard", "fgsm", "gradalign"]
  assert rows["fgsm"]["expected_vs_fgsm"] == 1.0
  assert rows["gradalign"]["passes"] == {"forward": 0, "input_grad": 1, "weight_grad": 1,
                                         "second_order": 1}
  assert rows["standard"]["expected_step_s"] == rows["standard"]["step_s"]
  assert set(rows["fgsm"]["pass_s"]) == {"forward", "input_grad", "weight_grad", "second_order"}
  assert rows["gradalign"]["images_per_s"] > 0 and rows["gradalign"]["cost_vs_fgsm"] > 0
  assert result["eval"][0]["points"] == 8 and result["environment"]["jax"]
  assert "xla_cpu_experimental_onednn_custom_call" in result["environment"]["xla_flags"]


def test_benchmark_window_fills_min_window_s():
  from fastadv_jax import benchmark
  assert benchmark.window_steps(5, one_step_s=0.01, min_window_s=0.5) == 50
  assert benchmark.window_steps(5, one_step_s=1.0, min_window_s=0.5) == 5
  assert benchmark.window_steps(3, one_step_s=0.2, min_window_s=0.0) == 3


@needs_torch
def test_torch_baseline_smoke():
  rows = [{"model": "small_cnn", "method": m, "batch": 4, "dtype": "float32", "width": 2}
          for m in ("pgd2", "gradalign_full")]
  proc = subprocess.run([str(TORCH_PY),
                         str(ROOT / "experiments" / "torch_baseline.py"), "--rows",
                         json.dumps(rows), "--windows=1", "--steps=1"], capture_output=True,
                        text=True, timeout=300)
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS_JSON ")]
  assert line, proc.stderr[-2000:]
  out = json.loads(line[0][len("RESULTS_JSON "):])
  assert [r["method"] for r in out] == ["pgd2", "gradalign_full"]
  assert all(np.isfinite(r["images_per_s"]) and r["images_per_s"] > 0 for r in out)


def test_conv_pass_bench_reads_the_models_convolutions_and_times_their_passes():
  import conv_pass_bench
  specs = conv_pass_bench.conv_shapes("small_cnn", 8)
  # small_cnn (width 16) on 28x28x1: conv 1->16 at 28x28, conv 16->32 at 14x14 after pooling.
  assert [(s["x"], s["w"], s["count"]) for s in specs] == [
      ([8, 28, 28, 1], [3, 3, 1, 16], 1), ([8, 14, 14, 16], [3, 3, 16, 32], 1)]
  resnet = conv_pass_bench.conv_shapes("preact_resnet18", 2)
  assert sum(s["count"] for s in resnet) == 20  # stem, 16 block convolutions, 3 shortcuts
  rows = conv_pass_bench.time_jax(specs[:1], reps=1, min_s=0.0)
  assert set(rows[0]["seconds"]) == set(conv_pass_bench.PASSES)
  assert all(t > 0 for t in rows[0]["seconds"].values())
  assert conv_pass_bench._flops(specs[0]) == 2 * 8 * 28 * 28 * 9 * 1 * 16


def test_profile_step_kinds():
  import profile_step
  ynn = ('  %ynn_fusion.1 = f32[3]{0} fusion(%b), '
         'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}')
  text = """
  %transpose_copy_fusion.3 = f32[4,2]{1,0} fusion(%a), kind=kLoop, calls=%c
""" + ynn + """
  ROOT %convolution.2 = f32[1,2,2,1]{3,2,1,0} convolution(%x, %w), window={size=3x3}
  %add_maximum_fusion = f32[8]{0} fusion(%psum.1), kind=kLoop
"""
  lines = profile_step.hlo_lines(text)
  kinds = {n: profile_step.kind_of(n, lines.get(n, "")) for n in (
      "transpose_copy_fusion.3", "ynn_fusion.1", "convolution.2", "add_maximum_fusion",
      "custom-call.4.clone__onednn$convolution")}
  assert kinds == {"transpose_copy_fusion.3": "layout transposes/copies",
                   "ynn_fusion.1": "YNNPACK fusions",
                   "convolution.2": "convolutions (XLA's own)",
                   "add_maximum_fusion": "other fusions (elementwise, reductions)",
                   "custom-call.4.clone__onednn$convolution": "oneDNN calls"}
