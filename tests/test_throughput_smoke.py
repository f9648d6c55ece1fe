"""The throughput harness runs in-process and writes well-formed JSON; the PyGRANSO reference degrades cleanly.

Never asserts a speed: the quick mode only proves the harness works.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from peel_jax import zoo


def test_quick_throughput_writes_finite_rows(tmp_path, capsys):
  from benchmarks import throughput

  out = tmp_path / "sub" / "throughput.json"
  result = throughput.main(["--quick", "--kinds", "paper,basic_down", "--out", str(out), "--repeats", "1",
                            "--min-time", "0"])
  assert "img/s" in capsys.readouterr().out
  data = json.loads(out.read_text())
  assert data["rows"] == json.loads(json.dumps(result["rows"]))
  meta = data["meta"]
  assert meta["quick"] and meta["peak_gflops"] > 0 and "RSS" in meta["memory_note"]
  plan = throughput.QUICK
  got = {(r["kind"], r["size"], r["batch"], r["inner"]) for r in data["rows"]}
  assert got == {(k, s, b, i) for k in ("paper", "basic_down") for s in plan.sizes for b in plan.batches
                 for i in plan.inners}
  for r in data["rows"]:
    for key in throughput.ROW_KEYS:
      assert key in r, key
      if isinstance(r[key], (int, float)) and not isinstance(r[key], bool):
        assert math.isfinite(r[key]), (r["kind"], r["inner"], key, r[key])
    assert r["images_per_s"] > 0 and r["compile_s"] >= 0 and r["iterations_run"] >= 1
    assert 0.0 <= r["converged_fraction"] <= 1.0
    assert r["achieved_gflops"] > 0 and r["max_rss_mb"] > 0
  assert data["network"] == []


def test_quick_throughput_gains_precision_peaks_and_network_rows(tmp_path):
  import jax

  import peel_jax
  from benchmarks import throughput

  out = tmp_path / "t.json"
  argv = ["--quick", "--kinds", "paper", "--batches", "1", "--inners", "lm", "--gains", "0.3", "--precision",
          "highest", "--repeats", "1", "--min-time", "0", "--network", "--network-layers", "layer1.0",
          "--network-size", "32", "--network-max-iters", "2", "--network-cg-iters", "2", "--network-repeats", "0",
          "--network-jit", "--out", str(out)]
  try:
    throughput.main(argv)
  finally:
    jax.config.update("jax_default_matmul_precision", None)  # a process-wide setting: leave the others theirs
  data = json.loads(out.read_text())
  meta = data["meta"]
  assert meta["matmul_precision"] == "highest"
  for key in ("matmul_highest_gflops", "matmul_default_gflops", "conv_highest_gflops", "conv_default_gflops"):
    assert meta["peaks"][key] > 0, key
  assert meta["peaks"]["fp32_gflops"] == max(meta["peaks"]["matmul_highest_gflops"],
                                             meta["peaks"]["conv_highest_gflops"])
  (row,) = data["rows"]
  assert row["branch_gain"] == 0.3 and math.isfinite(row["pct_of_fp32_peak"]) and math.isfinite(row["residual_worst"])
  assert row["device_peak_bytes"] is None or row["device_peak_bytes"] > 0  # None (n/a) on CPU
  loop, jitted = data["network"]
  assert loop["driver"] == "loop" and not loop["jit"] and loop["steady_s"] is None  # --network-repeats 0
  assert loop["images_per_s_from"] == "first call" and loop["model_gflop"] > 0 and loop["achieved_gflops"] > 0
  assert loop["blocks"] == 1 and math.isfinite(loop["psnr_median"])
  if hasattr(peel_jax, "NetworkConfig"):  # the one-program backward pass (issue 9)
    assert jitted["jit"] and jitted["driver"] == "scan" and jitted["compile_s"] > 0, jitted
    assert math.isfinite(jitted["psnr_median"]) and jitted["xla_flops_once"] > 0
  else:
    assert "skipped" in jitted
  assert "| resnet18" in throughput.network_markdown_table(data["network"])
  assert "| paper | 16 | 1 | 0.3 |" in throughput.markdown_table(data["rows"])


def test_flop_model_counts_convs_and_lm_evaluations():
  from benchmarks import throughput
  from peel_jax import SolverConfig

  c, s = 8, 16
  paper = zoo.block_problem("paper", channels=c, size=s, n=1).block
  assert throughput.block_forward_flops(paper, s) == 2 * (2.0 * s * s * c * c * 9)
  down = zoo.block_problem("basic_down", channels=c, size=s, n=1).block
  h = s // 2  # stride 2: first conv c -> 2c, second 2c -> 2c, shortcut 1x1 c -> 2c
  expected = 2.0 * h * h * (2 * c) * c * 9 + 2.0 * h * h * (2 * c) * (2 * c) * 9 + 2.0 * h * h * (2 * c) * c
  assert throughput.block_forward_flops(down, s) == expected
  assert throughput.forwards_per_iteration(SolverConfig(cg_iters=20)) == 1 + 40 + 1 + 5
  assert throughput.forwards_per_iteration(SolverConfig(inner="adam")) == 2


def test_pygranso_reference_imports_without_pygranso_and_says_how_to_install(tmp_path, monkeypatch):
  from benchmarks import pygranso_reference as pr

  est = pr.memory_estimate(64, 16)
  assert est["n_vars"] == 3 * 64 * 16 * 16 and est["constraint_jacobians_bytes"] == 4 * 64 * 256 * est["n_vars"] * 8
  assert est["total_full_bfgs_gib"] > 17  # DESIGN.md: over 17 GB at 64 channels, 16x16
  try:
    import pygranso  # noqa: F401
  except ImportError:
    pass
  else:
    pytest.skip("pygranso is installed here; the missing-package path cannot be exercised")
  with pytest.raises(pr.PyGRANSOMissing, match="pip install --no-deps pygranso==1.2.0"):
    pr.import_pygranso()
  problems = tmp_path / "p.npz"
  np.savez(problems, gains=np.asarray([0.3]))
  with pytest.raises(SystemExit, match="pygranso is not installed"):
    pr.main(["solve", "--problems", str(problems), "--out", str(tmp_path / "o.json")])


def test_pygranso_export_matches_the_zoo_problem(tmp_path):
  from benchmarks import pygranso_reference as pr

  out = pr.export(str(tmp_path / "p.npz"), gains=(0.3,))
  data = np.load(out)
  prob = zoo.block_problem("paper", channels=5, size=8, n=1, branch_gain=0.3)
  np.testing.assert_array_equal(data["g0.3/x"], np.asarray(prob.x))
  np.testing.assert_array_equal(data["g0.3/y"], np.asarray(prob.y))
  np.testing.assert_array_equal(data["g0.3/w2"], np.asarray(prob.block.params["convs"][1]["kernel"]))
