"""The block-solver benchmark harness runs and writes well-formed output; the fixed-point baseline is correct.

Never asserts a speed: the quick mode only proves the harness works.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from peel_jax import relative_error, zoo
from peel_jax.baselines import fixed_point
from peel_jax.blocks import Block, BlockSpec


def test_fixed_point_converges_on_contractive_paper_block():
  prob = zoo.block_problem("paper", channels=8, size=16, branch_gain=0.3)
  x_hat, info = fixed_point(prob.block, prob.y, tol=1e-6)
  err = np.asarray(relative_error(x_hat, prob.x))
  assert x_hat.shape == prob.x.shape
  assert np.all(err <= 1e-4), err
  assert np.all(np.asarray(info.converged)) and not np.any(np.asarray(info.diverged))
  assert np.all(np.asarray(info.residual) <= 1e-6 * 1.0001)
  assert np.all(np.asarray(info.iterations) > 0)
  assert set(info._fields) == {"residual", "max_violation", "comp_gap", "iterations", "converged", "diverged", "path"}
  assert info.path is None  # only invert_block says which of its paths solved an image
  for leaf in jax.tree.leaves(info):
    assert leaf.shape == (prob.y.shape[0],)


def test_fixed_point_preact_single_image():
  prob = zoo.block_problem("preact", channels=8, size=16, n=1, branch_gain=0.3)
  x_hat, info = fixed_point(prob.block, prob.y[0])
  assert x_hat.shape == prob.x.shape[1:]
  assert info.residual.shape == ()
  assert float(relative_error(x_hat[None], prob.x)[0]) <= 1e-4


def test_fixed_point_reports_divergence_at_he_scale():
  prob = zoo.block_problem("paper", channels=5, size=8, n=2, branch_gain=1.0)
  x_hat, info = fixed_point(prob.block, prob.y, iters=50)
  assert np.all(np.isfinite(np.asarray(x_hat)))  # the best iterate, never a blown-up one
  assert not np.any(np.asarray(info.converged))


def _affine(k, cin, cout):
  return {"kernel": np.zeros((k, k, cin, cout), np.float32), "bias": np.zeros((cout,), np.float32)}


@pytest.mark.parametrize("variant, why", [
    ("post_activation", "post-add relu"),
    ("conv_shortcut", "shortcut is 'conv'"),
    ("stem", "the stem is not a residual block"),
])
def test_fixed_point_rejects_blocks_it_does_not_apply_to(variant, why):
  c = 8
  if variant == "stem":
    spec = BlockSpec(kind="stem", name="stem", kernels=(7,), strides=(2,), groups=(1,), shortcut="none", stride=4,
                     post_activation=False, pool="max", in_channels=3, out_channels=64)
    params = {"convs": (_affine(7, 3, 64),)}
  else:
    down = variant == "conv_shortcut"
    spec = BlockSpec(kind="basic", name="layer2.0", kernels=(3, 3), strides=(2 if down else 1, 1), groups=(1, 1),
                     shortcut="conv" if down else "identity", stride=2 if down else 1, post_activation=True,
                     in_channels=c, out_channels=2 * c if down else c)
    params = {"convs": (_affine(3, c, spec.out_channels), _affine(3, spec.out_channels, spec.out_channels))}
    if down:
      params["shortcut"] = _affine(1, c, 2 * c)
  y = np.ones((1, 8, 8, spec.out_channels), np.float32)
  with pytest.raises(ValueError, match="identity-shortcut blocks without post-add activation") as e:
    fixed_point(Block(params=params, spec=spec), y)
  assert why in str(e.value)


def test_quick_benchmark_writes_well_formed_json(tmp_path, capsys):
  from benchmarks import block_solver

  out = tmp_path / "sub" / "block_solver.json"
  result = block_solver.main(["--quick", "--out", str(out), "--repeats", "1", "--min-time", "0"])
  printed = capsys.readouterr().out
  assert "method" in printed and "fixed_point" in printed
  data = json.loads(out.read_text())
  assert data["rows"] == json.loads(json.dumps(result["rows"]))
  meta = data["meta"]
  for key in ("command", "date", "devices", "cpu_model", "versions", "solver_config", "total_wall_s"):
    assert key in meta, key
  assert meta["command"].startswith("python -m benchmarks.block_solver --quick")
  assert meta["versions"]["jax"] == jax.__version__
  plan = block_solver.QUICK
  expected = {(p[0], g, b, m) for p in plan.problems for g in plan.gains for b in plan.batches
              for m in block_solver.METHODS}
  got = {(r["problem"], r["branch_gain"], r["batch"], r["method"]) for r in data["rows"]}
  assert got == expected and len(data["rows"]) == len(expected)
  for r in data["rows"]:
    assert set(block_solver.ROW_KEYS) <= set(r), set(block_solver.ROW_KEYS) - set(r)
    for key in block_solver.ROW_KEYS:
      if isinstance(r[key], (int, float)) and not isinstance(r[key], bool):
        assert math.isfinite(r[key]), (r["method"], key, r[key])
    assert r["seconds_per_image"] > 0 and r["compile_s"] >= 0
    assert 0.0 <= r["converged_fraction"] <= 1.0
    assert r["rel_error_median"] <= r["rel_error_worst"] and r["residual_median"] <= r["residual_worst"]
  assert isinstance(data["targets"], list)
