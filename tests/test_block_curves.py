"""Smoke test of ``benchmarks.block_curves --quick``: error-against-time curves on the toy block.

Never asserts a speed. Asserts that every method gave a point at every budget of its quick ladder on both gains, that
the errors are finite and recomputable, that the time-to-error table is what its definition says of the points, and
that the outputs are written as promised (a valid PNG; an existing ``--out`` is not overwritten without
``--overwrite``).
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from benchmarks import block_curves as bc


def _methods() -> tuple:
  # ours_newton_gmres is one more ours_variant entry (tested below); leaving it out saves its compile here.
  return tuple(m for m in bc.CURVE_METHODS
               if (m != bc.REFERENCE or bc.torch_available()) and m != "ours_newton_gmres")


def test_quick_curves_are_complete_and_the_table_follows_from_the_points(tmp_path, capsys):
  out, png = tmp_path / "sub" / "curves.json", tmp_path / "curves.png"
  methods = _methods()
  result = bc.main(["--quick", "--methods", ",".join(methods), "--out", str(out), "--png", str(png)])
  printed = capsys.readouterr().out
  assert "to rel_error <= 1e-01" in printed and f"wrote {out}" in printed

  data = json.loads(out.read_text())
  assert data["points"] == json.loads(json.dumps(result["points"]))
  meta = data["meta"]
  assert meta["command"].startswith("python -m benchmarks.block_curves --quick")
  assert meta["quick"] and meta["versions"]["jax"] == jax.__version__ and set(meta["methods"]) == set(methods)

  # A point for every method, gain and budget of the quick ladder (and ours' default-config point); finite numbers.
  expected = set()
  for m in methods:
    budgets = list(bc.CURVE_METHODS[m].quick_ladder) + ([bc.DEFAULT] if m.startswith("ours") else [])
    expected |= {(m, g, b) for g in bc.GAINS for b in budgets}
  got = [(p["method"], p["branch_gain"], p["budget"]) for p in data["points"]]
  assert set(got) == expected and len(got) == len(expected)
  for p in data["points"]:
    assert p["problem"] == "toy" and p["batch"] == 1
    for key in ("seconds", "rel_error", "residual", "load_1min"):
      assert isinstance(p[key], float) and math.isfinite(p[key]), (p["method"], p["budget"], key, p[key])
    assert p["seconds"] > 0 and p["rel_error"] >= 0 and p["residual"] >= 0 and p["timed_calls"] >= 1
  if bc.REFERENCE in methods:
    torch_pts = [p for p in data["points"] if p["method"] == bc.REFERENCE]
    assert all(p["torch_num_threads"] == 1 for p in torch_pts)
    for g in bc.GAINS:  # checkpoints of one run: the time grows with the step count
      secs = [p["seconds"] for p in sorted((p for p in torch_pts if p["branch_gain"] == g), key=lambda p: p["budget"])]
      assert secs == sorted(secs)

  # The errors are those of the returned x_hat: ours at its default config solves the toy (a loose, stable check).
  default = {p["branch_gain"]: p for p in data["points"] if p["budget"] == bc.DEFAULT}
  assert all(p["rel_error"] < 1e-4 and p["residual"] < 1e-4 for p in default.values())

  # time_to_error: the fastest measured point at or below each level, or "not reached" with the best error.
  for key, metric in (("time_to_error", "rel_error"), ("time_to_residual", "residual")):
    rows = data[key]
    assert len(rows) == len(methods) * len(bc.GAINS) * len(bc.LEVELS)
    for r in rows:
      pts = [p for p in data["points"] if (p["method"], p["branch_gain"]) == (r["method"], r["branch_gain"])]
      below = [p for p in pts if p[metric] <= r["level"]]
      assert r["metric"] == metric and r["best"] == min(p[metric] for p in pts)
      assert r["reached"] == bool(below)
      if below:
        first = min(below, key=lambda p: p["seconds"])
        assert (r["seconds"], r["budget"], r["value"]) == (first["seconds"], first["budget"], first[metric])
        assert r["value"] <= r["level"]
      else:
        assert r["seconds"] is None and r["ratio_vs_reference"] is None
      if r["reached"] and bc.REFERENCE in methods:
        ref = [p for p in data["points"] if (p["method"], p["branch_gain"]) == (bc.REFERENCE, r["branch_gain"])]
        ref_below = [p["seconds"] for p in ref if p[metric] <= r["level"]]
        ref_time = min(ref_below) if ref_below else max(p["seconds"] for p in ref)
        assert r["ratio_kind"] == ("exact" if ref_below else "lower_bound")
        assert r["ratio_vs_reference"] == pytest.approx(ref_time / r["seconds"])

  # A real PNG (signature and IHDR), two rows (error, residual) by two gains of panels.
  blob = png.read_bytes()
  assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR"
  width, height = int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")
  assert width > 600 and height > 400
  assert not list(tmp_path.glob("**/.tmp_*"))  # the atomic writes left no temporary file
  umask = os.umask(0)
  os.umask(umask)
  assert all((f.stat().st_mode & 0o777) == (0o666 & ~umask) for f in (out, png))  # not mkstemp's 0600

  # An existing --out is refused (before any solving) unless --overwrite is given.
  before = out.read_bytes()
  with pytest.raises(SystemExit, match="refusing to overwrite"):
    bc.main(["--quick", "--out", str(out), "--png", ""])
  assert out.read_bytes() == before


def test_time_to_error_on_hand_made_points():
  def pt(method, budget, seconds, err):
    return {"problem": "p", "branch_gain": 1.0, "method": method, "budget": budget, "seconds": seconds,
            "rel_error": err, "residual": err}

  points = [pt("ours", 1, 0.1, 0.5), pt("ours", 2, 0.2, 1e-2), pt("ours", "default", 0.15, 1e-6),
            pt(bc.REFERENCE, 10, 1.0, 0.2), pt(bc.REFERENCE, 100, 4.0, 0.05)]
  rows = {(r["method"], r["level"]): r for r in bc.time_to_error(points)}
  r = rows[("ours", 1e-1)]  # the default point is faster than budget 2 and also below 1e-1
  assert (r["budget"], r["seconds"], r["ratio_kind"]) == ("default", 0.15, "exact")
  assert r["ratio_vs_reference"] == pytest.approx(4.0 / 0.15)
  r = rows[("ours", 1e-5)]
  assert r["ratio_kind"] == "lower_bound" and r["ratio_vs_reference"] == pytest.approx(4.0 / 0.15)
  r = rows[(bc.REFERENCE, 1e-3)]
  assert not r["reached"] and r["best"] == 0.05 and r["seconds"] is None
  table = bc.markdown_table(bc.time_to_error(points))
  assert "not reached (best 5.0e-02)" in table and ">=26.7x" in table


def test_ours_variant_builds_from_overrides_and_rejects_unknown_fields():
  v = bc.ours_variant({"cg_iters": 7}, ladder=(1, 2))
  assert v.config["cg_iters"] == 7 and v.ladder == (1, 2) and v.quick_ladder == bc.OURS_QUICK_LADDER
  with pytest.raises(TypeError):
    bc.ours_variant({"no_such_field": 1})
  with pytest.raises(TypeError, match="no_such_field"):
    bc.ours_variant({}, budget_fields=("no_such_field",))
  with pytest.raises(ValueError):
    bc.ours_variant({"inner": "nope"})
  assert np.all(np.diff(bc.CURVE_METHODS["ours_al"].ladder) > 0)
  assert np.all(np.diff(bc.CURVE_METHODS["ours"].ladder) < 0)  # tolerances, loosest first
