"""invert_block: exactness where the math allows, honesty where it does not, one compilation per shape."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peel_jax import SolverConfig, certify_block, invert_block, relative_error, relative_residual, zoo
from peel_jax.baselines import authors_penalty
from peel_jax.blocks import Block, BlockSpec
from peel_jax.problems import block as block_problem
from peel_jax.solver import engine


def _problem(kind, gain, channels=16, size=16, n=4, seed=0):
  return zoo.block_problem(kind, channels=channels, size=size, n=n, branch_gain=gain, seed=seed)


def _authors(p):
  """The authors' method (1000 Adam steps, their penalty) at ``p.y``, jitted in chunks of 2 steps as the block_curves
  quick runner does: the same steps as the default chunk of 10 (residuals and errors agree to 1e-3 relative on every
  case here, rounding), while compiling 10 unrolled steps cost about 5x the CPU of running all 1000."""
  return authors_penalty(p.block, p.y, key=jax.random.key(0), chunk=2)


# Block kinds whose every image reaches an exact preimage (relative residual <= 1e-4), He scale included.
EXACT = [("paper", 1.0), ("paper", 0.3), ("basic", 1.0), ("basic", 0.3), ("basic_down", 1.0), ("basic_down", 0.3),
         ("preact", 0.3), ("leaky_relu", 0.3), ("prelu", 0.3)]


@pytest.mark.parametrize("kind,gain", EXACT)
def test_exact_preimage(kind, gain):
  p = _problem(kind, gain)
  x_hat, info = invert_block(p.block, p.y)
  res = np.asarray(relative_residual(p.block, x_hat, p.y))
  assert res.max() <= 1e-4, res
  # info.residual is computed inside jit, res eagerly: at float32's floor (~6e-8 here) the two evaluation orders
  # differ by ~1e-8, so the comparison allows that much absolute rounding.
  np.testing.assert_allclose(np.asarray(info.residual), res, rtol=1e-3, atol=1e-8)
  # the flag is honest: converged exactly where the residual reached the solver's tolerance
  np.testing.assert_array_equal(np.asarray(info.converged), res <= SolverConfig().tol)
  assert not np.any(np.asarray(info.diverged))
  if p.block.spec.input_nonneg:
    assert float(x_hat.min()) >= 0.0  # the architecture's guarantee is kept exactly


# Identity blocks with a contractive branch: the input itself is recovered.
@pytest.mark.parametrize("kind", ["paper", "preact", "leaky_relu", "prelu"])
def test_contractive_identity_recovers_input(kind):
  p = _problem(kind, 0.3)
  x_hat, _ = invert_block(p.block, p.y)
  err = np.asarray(relative_error(x_hat, p.x))
  assert np.median(err) <= 1e-4, err
  assert err.max() <= 1e-3, err


# Cases where an exact preimage is not reached at every image (measured levels; see the issue note): asserted at the
# level reached, and against the authors' solver on both residual and input error, on every image.
REACHED = [("bottleneck", 1.0, 5e-3), ("bottleneck", 0.3, 1e-3), ("preact", 1.0, 1e-3), ("leaky_relu", 1.0, 1e-2),
           ("prelu", 1.0, 5e-3), ("gelu", 1.0, 1e-1), ("gelu", 0.3, 1e-4)]


@pytest.mark.parametrize("kind,gain,level", REACHED)
def test_hard_cases_reach_level_and_beat_authors(kind, gain, level):
  p = _problem(kind, gain, n=2)
  x_hat, info = invert_block(p.block, p.y)
  res = np.asarray(info.residual)
  assert res.max() <= level, res
  if kind == "gelu":
    return  # the authors' lifted penalty needs a ReLU-family activation
  xb, ib = _authors(p)
  assert np.all(res < np.asarray(ib.residual)), (res, np.asarray(ib.residual))
  err, err_b = np.asarray(relative_error(x_hat, p.x)), np.asarray(relative_error(xb, p.x))
  assert np.all(err < err_b), (err, err_b)


def test_beats_authors_on_paper_toy():
  p = zoo.block_problem("paper", channels=5, size=8, n=2, branch_gain=1.0)
  x_hat, info = invert_block(p.block, p.y)
  xb, ib = _authors(p)
  assert np.all(np.asarray(info.residual) < 1e-4)
  assert np.all(np.asarray(info.residual) < np.asarray(ib.residual))
  assert np.all(np.asarray(relative_error(x_hat, p.x)) < np.asarray(relative_error(xb, p.x)))


def test_images_are_independent():
  p = _problem("basic", 1.0)  # test_exact_preimage's batch of 4: its compiled solve serves here too
  x_all, info_all = invert_block(p.block, p.y)
  x_one, info_one = invert_block(p.block, p.y[1:2])
  np.testing.assert_array_equal(np.asarray(info_all.iterations)[1], np.asarray(info_one.iterations)[0])
  np.testing.assert_allclose(np.asarray(x_all[1]), np.asarray(x_one[0]), atol=1e-4)


def test_unbatched_observation_gives_unbatched_result():
  p = _problem("paper", 0.3, n=1)
  x_hat, info = invert_block(p.block, p.y[0])
  assert x_hat.shape == p.x.shape[1:]
  assert info.residual.shape == ()
  assert float(info.residual) <= 1e-4


def test_one_compilation_per_shape():
  p = _problem("paper", 0.3, n=2)
  # Warm both paths: the fixed point solves p.y; a scaled y (no longer an exact output) falls back to the AL.
  for scale in (1.0, 1.1):
    invert_block(p.block, p.y * scale)
  before = engine.iterate_batch._cache_size()
  for scale in (0.9, 1.2):
    invert_block(p.block, p.y * scale)
  assert engine.iterate_batch._cache_size() == before

  cfg = SolverConfig(driver="while_loop", max_iters=5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def solve(y):
    return invert_block(p.block, y, config=cfg)[0]

  a = solve(p.y)
  b = solve(p.y * 1.05)
  assert a.shape == b.shape == p.x.shape


def test_while_loop_driver_matches_python_driver():
  p = _problem("paper", 1.0, n=2)
  xa, ia = invert_block(p.block, p.y, config=SolverConfig(driver="python"))
  xb, ib = invert_block(p.block, p.y, config=SolverConfig(driver="while_loop"))
  np.testing.assert_array_equal(np.asarray(ia.iterations), np.asarray(ib.iterations))
  np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), atol=1e-5)


@pytest.mark.parametrize("inner", ["adam", "lbfgsb"])
def test_other_inner_solvers_make_progress(inner):
  p = _problem("paper", 0.3, channels=8, n=2)
  cfg = SolverConfig(inner=inner, max_iters=100 if inner == "adam" else 20, init="zeros", learning_rate=0.05)
  x0 = jnp.zeros_like(p.x)
  start = np.asarray(relative_residual(p.block, x0, p.y))
  _, info = invert_block(p.block, p.y, config=cfg)
  assert np.all(np.asarray(info.residual) < 0.5 * start)


def test_lifted_formulation():
  p = _problem("paper", 0.3, channels=8, n=2)
  _, info = invert_block(p.block, p.y, config=SolverConfig(formulation="lifted", max_iters=60))
  assert np.all(np.asarray(info.residual) < 1e-3)
  assert np.all(np.asarray(info.max_violation) < 1e-2)


def test_float64_under_x64():
  p = _problem("paper", 0.3, channels=8, n=1)
  with jax.enable_x64(True):
    # y from the float64 forward: a float32 y carries rounding that no x >= 0 reproduces beyond ~2e-8
    y = p.block(jnp.asarray(np.asarray(p.x), jnp.float64))
    x_hat, info = invert_block(p.block, y, config=SolverConfig(tol=1e-12))
    assert x_hat.dtype == jnp.float64
    assert float(info.residual[0]) <= 1e-10


def test_diverged_image_is_flagged_not_hidden():
  p = _problem("paper", 0.3, channels=8, n=1)
  convs = list(p.block.params["convs"])
  convs[1] = {"kernel": convs[1]["kernel"], "bias": convs[1]["bias"].at[0].set(jnp.nan)}
  bad = Block({**p.block.params, "convs": tuple(convs)}, p.block.spec)
  x_hat, info = invert_block(bad, p.y)
  assert bool(info.diverged[0]) and not bool(info.converged[0])
  assert bool(jnp.all(jnp.isfinite(x_hat)))  # the last finite iterate, flagged


# --- bad input: a clear error before anything compiles ----------------------------------------------------------


@pytest.fixture(scope="module")
def paper_block():
  return _problem("paper", 0.3, channels=8, n=1)


def _no_compile(fn):
  before = block_problem._init_jit._cache_size()
  fn()
  assert block_problem._init_jit._cache_size() == before


def test_error_wrong_channels(paper_block):
  y = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match=r"y has 3 channels .* outputs 8 channels"):
    _no_compile(lambda: invert_block(paper_block.block, y))


def test_error_wrong_rank(paper_block):
  with pytest.raises(ValueError, match=r"must be \(N, H, W, C\) or \(H, W, C\)"):
    invert_block(paper_block.block, jnp.zeros((2, 1, 16, 16, 8)))


def test_error_empty_observation():
  p = _problem("basic_down", 0.3, channels=8, n=1)
  with pytest.raises(ValueError, match="empty dimension"):
    invert_block(p.block, jnp.zeros((1, 0, 8, 16)))


def test_error_non_finite_observation(paper_block):
  y = paper_block.y.at[0, 3, 3, 1].set(jnp.nan)
  with pytest.raises(ValueError, match=r"1 non-finite value\(s\) .* image\(s\) \[0\]"):
    _no_compile(lambda: invert_block(paper_block.block, y))


def test_error_negative_output_of_relu_block():
  p = _problem("basic", 0.3, channels=8, n=1)
  with pytest.raises(ValueError, match="negative values but block .* ends in a ReLU"):
    invert_block(p.block, p.y - 1.0)


def test_error_unknown_block_kind(paper_block):
  with pytest.raises(ValueError, match="unknown block kind 'dense'"):
    dataclasses.replace(paper_block.block.spec, kind="dense")


def test_error_not_a_block(paper_block):
  with pytest.raises(TypeError, match="expected a peel_jax.blocks.Block"):
    invert_block(lambda x: x, paper_block.y)


def test_error_bad_x0(paper_block):
  with pytest.raises(ValueError, match="x0 has shape"):
    invert_block(paper_block.block, paper_block.y, x0=jnp.zeros((1, 4, 4, 8)))


def test_error_bad_config(paper_block):
  with pytest.raises(ValueError, match="unknown inner 'sgd'"):
    invert_block(paper_block.block, paper_block.y, config=SolverConfig(inner="sgd"))


# --- is the input determined? --------------------------------------------------------------------------------------


def test_certify_contraction_is_determined():
  p = _problem("paper", 0.05, channels=8, n=2)
  x_hat, _ = invert_block(p.block, p.y)
  cert = certify_block(p.block, x_hat, p.y)
  assert cert.global_bound < 1
  assert cert.status == ["determined", "determined"]
  assert np.all(cert.local_lipschitz < 1)


def test_certify_post_relu_block_is_not_injective():
  p = _problem("basic", 0.3, channels=8, n=2)
  x_hat, _ = invert_block(p.block, p.y)
  cert = certify_block(p.block, x_hat, p.y, starts=2, key=jax.random.key(1))
  assert cert.status == ["not_injective", "not_injective"]
  assert np.all(cert.spread > 1e-3)
  assert np.all(cert.exact_starts >= 2)


def test_certify_strided_block_is_underdetermined():
  p = _problem("basic_down", 1.0, channels=8, n=1)
  x_hat, _ = invert_block(p.block, p.y)
  cert = certify_block(p.block, x_hat, p.y)
  assert cert.status == ["underdetermined"]


def test_certify_lipschitz_bound_is_an_upper_bound():
  p = _problem("paper", 0.3, channels=8, n=2)
  from peel_jax._certify import branch_lipschitz_bound, local_lipschitz

  bound = branch_lipschitz_bound(p.block, p.x.shape[1:])
  local = np.asarray(local_lipschitz(p.block, p.x))
  assert np.all(local <= bound * 1.01)
  # and the branch really expands some direction by about the local constant: a difference quotient check
  f = lambda t: p.block.branch(t)
  d = jax.random.normal(jax.random.key(3), p.x.shape) * 1e-3
  ratio = jnp.linalg.norm((f(p.x + d) - f(p.x)).reshape(2, -1), axis=1) / jnp.linalg.norm(d.reshape(2, -1), axis=1)
  assert np.all(np.asarray(ratio) <= bound * 1.01)
