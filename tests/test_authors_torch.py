"""Smoke test of ``benchmarks.authors_torch --quick``: the authors' method in eager torch, our JAX port, ours.

Never asserts a speed. Asserts that the torch rebuild is the zoo block, that the torch loop and the JAX port are the
same method (from the same start they agree to float32 rounding), and that ours is far more accurate on the toy.
"""

from __future__ import annotations

import json
import math

from benchmarks import authors_torch

METHODS = {"authors_torch", "authors_jax", "ours"}


def _finite_numbers(obj):
  if isinstance(obj, dict):
    for v in obj.values():
      yield from _finite_numbers(v)
  elif isinstance(obj, list):
    for v in obj:
      yield from _finite_numbers(v)
  elif isinstance(obj, float):
    yield obj


def test_quick_run_is_well_formed_and_ours_is_far_more_accurate(tmp_path):
  out = tmp_path / "authors_torch.json"
  # One torch thread and a 2-step probe keep this fast on a loaded machine (see the module docstring).
  authors_torch.main(["--quick", "--torch-threads", "1", "--probe-steps", "2", "--out", str(out)])
  result = json.loads(out.read_text())
  assert set(result) == {"meta", "rows", "ratios"}
  meta, rows = result["meta"], result["rows"]
  assert meta["quick"] and meta["authors_method"]["steps"] == authors_torch.QUICK_STEPS
  for key in ("torch", "jax", "numpy"):
    assert meta["versions"][key]
  assert meta["threads"]["torch_num_threads"] == 1 and meta["threads"]["torch_default_num_threads"] >= 1
  assert len(meta["load_average_start"]) == 3 and meta["date"]
  assert all(math.isfinite(v) for v in _finite_numbers(result)), "non-finite number in the JSON"

  assert {r["problem"] for r in rows} == {"toy"}
  for gain in authors_torch.GAINS:
    by = {r["method"]: r for r in rows if r["branch_gain"] == gain}
    assert set(by) == METHODS
    for r in by.values():
      assert r["finite"] and r["seconds_per_image"] > 0
      assert r["port_check_residual"] <= authors_torch.PORT_TOL  # the torch block reproduces the zoo's y
      for key in ("rel_error", "residual", "paper_pct"):
        assert r[key] >= 0
    torch_row, jax_row, ours = by["authors_torch"], by["authors_jax"], by["ours"]
    assert "default_threads_probe" in torch_row and "warmup_start" in jax_row
    # Same start, same method: the eager torch loop and the JAX port agree to float32 rounding.
    assert torch_row["same_start_as_jax"]["x_hat_diff_vs_jax_rel"] <= 1e-4
    # Ours recovers the input; 50 steps of the authors' method do not come close.
    assert ours["rel_error"] <= 1e-4
    assert ours["rel_error"] * 1e3 <= min(torch_row["rel_error"], jax_row["rel_error"])
  assert len(result["ratios"]) == len(authors_torch.GAINS)
