"""The roofline estimator runs in-process at tiny shapes and writes well-formed, self-consistent JSON.

Never asserts a speed: only that the cost analysis, the bounds and the bookkeeping hang together.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest


def test_bounds_follow_the_published_peaks():
  from benchmarks import roofline_estimate as re_

  h100 = re_.DEVICES["H100 SXM5"]
  b = re_.bounds(flops=h100["fp32_tflops"] * 1e12, nbytes=0.0)["H100 SXM5"]
  assert b["fp32_s"] == pytest.approx(1.0) and b["fp32_bound_by"] == "compute"
  assert b["default_s"] == pytest.approx(h100["fp32_tflops"] / h100["default_tflops"])
  b = re_.bounds(flops=0.0, nbytes=h100["hbm_tb_s"] * 1e12)["H100 SXM5"]
  assert b["fp32_s"] == pytest.approx(1.0) and b["default_bound_by"] == "memory"
  for d in re_.DEVICES.values():
    assert d["source"] and d["fp32_tflops"] > 0 and d["default_tflops"] >= d["fp32_tflops"] and d["hbm_tb_s"] > 0
  cpu = re_.cpu_bound(2e9, 1e9, {"peak_gflops": 1.0, "bandwidth_gb_s": 4.0})
  assert cpu["bound_s"] == pytest.approx(2.0) and cpu["bound_by"] == "compute"


def test_quick_block_estimates_are_consistent(tmp_path):
  from benchmarks import roofline_estimate as re_

  out = tmp_path / "r" / "roofline.json"
  result = re_.main(["--quick", "--configs", "block", "--out", str(out), "--repeats", "1"])
  data = json.loads(out.read_text())
  assert data["configs"] == json.loads(json.dumps(result["configs"]))
  assert "NOT MEASUREMENTS" in data["meta"]["label"]
  plan = re_.QUICK
  assert {(c["batch"], c["gain"]) for c in data["configs"]} == {(n, g) for n in plan.batches for g in re_.GAINS}
  assert {u["unit"] for u in data["units"]} == {f"paper/c{plan.channels}/s{plan.size}/N{n}" for n in plan.batches}
  for u in data["units"]:
    assert u["flops"] > 0 and u["bytes"] > 0 and u["cpu"]["measured_s"] > 0, u
    assert "iterate_batch" in u["program"] or "invert_block" in u["program"]
  one, two = (next(u for u in data["units"] if u["y_shape"][0] == n) for n in plan.batches)
  assert two["flops"] == pytest.approx(one["flops"] * plan.batches[1] / plan.batches[0], rel=0.05)
  for c in data["configs"]:
    it = next(iter(c["iterations"].values()))
    assert 1 <= it <= plan.config.max_iters
    assert c["full"]["flops"] == pytest.approx(it * c["per_iteration"]["flops"])
    for dev in re_.DEVICES:
      b = c["full"]["bounds"][dev]
      assert math.isfinite(b["fp32_s"]) and b["fp32_s"] >= b["default_s"] > 0
    solve = c["full"]["cpu"]["measured_solve"]
    if c["batch"] in plan.solve_batches:
      assert solve["iterations_run"] == it and solve["steady_s"] > 0
    else:
      assert solve is None and "assumed" in c["iterations_source"]
  assert "| configuration |" in data["markdown"] and "H100" in data["markdown"]


def test_network_units_cover_the_backward_path():
  from benchmarks import roofline_estimate as re_
  from peel_jax import SolverConfig

  args = argparse.Namespace(cpu_timing=False, cpu_time_limit=0.0, repeats=1, cpu_batch=None)
  ceilings = {"peak_gflops": 1.0, "bandwidth_gb_s": 1.0}
  units = re_.network_units("resnet18", "layer1.1", 32, 1, SolverConfig(max_iters=2, cg_iters=2), ceilings, args)
  assert [u["unit"] for u in units] == ["layer1.1:2", "layer1.0", "stem"]
  assert [u["count"] for u in units] == [1, 1, 1]
  assert all(u["flops"] > 0 and u["cpu"]["measured_s"] is None for u in units)
  row = re_._config_row("r18", "network", 1, units, {u["unit"]: 3 for u in units}, "cap", ceilings)
  assert row["full"]["flops"] == pytest.approx(3 * sum(u["flops"] for u in units))
