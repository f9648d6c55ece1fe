"""The fixed-point fast path and the Newton-GMRES inner of invert_block, against the AL/CGLS path on the zoo."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peel_jax
from peel_jax import zoo
from peel_jax.problems.block import fixed_point_obstacle
from peel_jax.solver.info import PATH_AL, PATH_FIXED_POINT

AL_ONLY = peel_jax.SolverConfig(fast_path="off")
FAST = peel_jax.SolverConfig()  # the default: fast path on


def _solve(prob, config):
  x_hat, info = peel_jax.invert_block(prob.block, prob.y, config=config)
  return np.asarray(x_hat), info


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind", ["paper", "preact"])
def test_fast_path_reaches_the_al_solution_on_contractive_blocks(kind):
  """Same preimage as the AL path, to float32 rounding, every image on the fast path; its residual is as small."""
  prob = zoo.block_problem(kind, channels=8, size=8, n=2, branch_gain=0.3)
  assert fixed_point_obstacle(prob.block) is None
  x_al, info_al = _solve(prob, AL_ONLY)
  x_fp, info_fp = _solve(prob, FAST)
  assert np.all(np.asarray(info_al.converged)) and np.all(np.asarray(info_fp.converged))
  assert np.all(np.asarray(info_fp.path) == PATH_FIXED_POINT)
  assert np.all(np.asarray(info_al.path) == PATH_AL)
  for i in range(2):
    assert _rel(x_fp[i], x_al[i]) < 2e-6, (i, _rel(x_fp[i], x_al[i]))
  assert float(np.max(info_fp.residual)) <= max(float(np.max(info_al.residual)), 1e-7) * 1.5


def test_fallback_on_a_block_that_does_not_contract():
  """At He scale the paper block's fixed point diverges: every image falls back and gets the AL path's result."""
  prob = zoo.block_problem("paper", channels=8, size=8, n=2, branch_gain=1.0)
  x_al, info_al = _solve(prob, AL_ONLY)
  x_fp, info_fp = _solve(prob, FAST)
  assert np.all(np.asarray(info_fp.path) == PATH_AL)
  np.testing.assert_array_equal(x_fp, x_al)
  np.testing.assert_array_equal(np.asarray(info_fp.converged), np.asarray(info_al.converged))
  # The attempt is charged: fixed-point steps are counted on top of the AL iterations.
  assert np.all(np.asarray(info_fp.iterations) > np.asarray(info_al.iterations))


def test_fast_path_is_skipped_where_the_block_is_not_a_fixed_point_form():
  prob = zoo.block_problem("basic_down", channels=8, size=8, n=2)
  assert "shortcut" in fixed_point_obstacle(prob.block)
  x_al, info_al = _solve(prob, AL_ONLY)
  x_fp, info_fp = _solve(prob, FAST)
  np.testing.assert_array_equal(x_fp, x_al)
  np.testing.assert_array_equal(np.asarray(info_fp.iterations), np.asarray(info_al.iterations))


def test_anderson_memory_reaches_the_same_solution():
  prob = zoo.block_problem("paper", channels=8, size=8, n=2, branch_gain=0.5)
  x_al, _ = _solve(prob, AL_ONLY)
  x_aa, info = _solve(prob, dataclasses.replace(FAST, anderson_memory=3))
  assert np.all(np.asarray(info.path) == PATH_FIXED_POINT)
  assert _rel(x_aa, x_al) < 5e-6


def test_fast_path_under_jit_equals_eager():
  prob = zoo.block_problem("paper", channels=8, size=8, n=2, branch_gain=0.3)
  x_eager, info_eager = _solve(prob, FAST)
  x_jit, info_jit = jax.jit(lambda y: peel_jax.invert_block(prob.block, y, config=FAST))(prob.y)
  np.testing.assert_allclose(np.asarray(x_jit), x_eager, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(info_jit.path), np.asarray(info_eager.path))


@pytest.mark.parametrize("kind", ["paper", "preact"])
def test_newton_gmres_reaches_the_lm_solution(kind):
  prob = zoo.block_problem(kind, channels=8, size=8, n=2, branch_gain=0.3)
  x_lm, info_lm = _solve(prob, AL_ONLY)
  x_nk, info_nk = _solve(prob, dataclasses.replace(AL_ONLY, inner="newton_gmres", cg_iters=10))
  assert np.all(np.asarray(info_nk.converged))
  assert _rel(x_nk, x_lm) < 2e-6


def test_newton_gmres_leaves_non_square_blocks_to_cgls():
  prob = zoo.block_problem("basic_down", channels=8, size=8, n=2)
  x_lm, _ = _solve(prob, AL_ONLY)
  x_nk, _ = _solve(prob, dataclasses.replace(AL_ONLY, inner="newton_gmres"))
  np.testing.assert_array_equal(x_nk, x_lm)


@pytest.mark.parametrize("field,value", [("fast_path", "always"), ("anderson_memory", -1), ("fast_path_iters", 0)])
def test_bad_fast_path_options_are_refused(field, value):
  prob = zoo.block_problem("paper", channels=8, size=8, n=2, branch_gain=0.3)  # this file's shapes: no new compile
  with pytest.raises(ValueError, match=field):
    peel_jax.invert_block(prob.block, prob.y, config=dataclasses.replace(FAST, **{field: value}))
