"""The Mahendran & Vedaldi (CVPR 2015) baseline: its priors, its optimisation, its contract."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peel_jax
from peel_jax import images, models
from peel_jax.baselines import mahendran_vedaldi
from peel_jax.cli import scale_branches

# The package exports the function under the module's name, so reach the module itself through importlib.
mv_module = importlib.import_module("peel_jax.baselines.mahendran_vedaldi")

KEY = jax.random.key(3)


# --- the priors against NumPy ---------------------------------------------------------------------------------------


def _np_alpha(x, alpha):
  return np.sum(np.abs(np.float64(x)) ** alpha, axis=(-3, -2, -1))


def _np_tv(x, beta):
  x = np.float64(x)
  out = np.zeros(x.shape[:-3])
  h, w = x.shape[-3], x.shape[-2]
  for i in range(h):
    for j in range(w):
      dj = x[..., i, j + 1, :] - x[..., i, j, :] if j + 1 < w else 0.0 * x[..., i, j, :]
      di = x[..., i + 1, j, :] - x[..., i, j, :] if i + 1 < h else 0.0 * x[..., i, j, :]
      out += np.sum((dj**2 + di**2) ** (beta / 2), axis=-1)
  return out


@pytest.mark.parametrize("alpha", [6.0, 2.0, 1.5])
def test_alpha_norm_matches_numpy(rng, alpha):
  x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(mv_module.alpha_norm(x, alpha), _np_alpha(x, alpha), rtol=1e-5)
  np.testing.assert_allclose(mv_module.alpha_norm(x[0], alpha), _np_alpha(x[0], alpha), rtol=1e-5)


@pytest.mark.parametrize("beta", [2.0, 1.0, 3.0])
def test_total_variation_matches_numpy(rng, beta):
  x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(mv_module.total_variation(x, beta), _np_tv(x, beta), rtol=1e-5)


def test_total_variation_penalises_noise_not_smoothness(rng):
  ii, jj = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
  smooth = np.stack([ii, jj, ii * jj], axis=-1).astype(np.float32)
  noisy = smooth + 0.3 * rng.normal(size=smooth.shape).astype(np.float32)
  for beta in (1.0, 2.0):
    assert float(mv_module.total_variation(noisy, beta)) > 5 * float(mv_module.total_variation(smooth, beta))
  assert float(mv_module.total_variation(np.full((8, 8, 3), 0.7, np.float32))) == 0.0
  # Flat regions (zero differences) and zero pixels keep finite gradients even where |.|^p is singular.
  flat = jnp.zeros((4, 4, 3))
  for f, p in ((mv_module.total_variation, 1.0), (mv_module.alpha_norm, 1.0), (mv_module.total_variation, 0.5)):
    g = jax.grad(lambda t: f(t, p))(flat)
    assert np.isfinite(np.asarray(g)).all()


def test_pixel_scale():
  assert mv_module.pixel_scale("imagenet") == pytest.approx(2.64, abs=1e-6)
  assert mv_module.pixel_scale(None) == mv_module.pixel_scale("imagenet")
  assert mv_module.pixel_scale((-1.0, np.array([0.5, 2.0, 1.0]))) == 2.0
  with pytest.raises(ValueError, match="unknown box"):
    mv_module.pixel_scale("unit")


# --- the optimisation ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net(photo):
  """Paper-variant resnet18 at 96x96 with residual branches scaled by 0.3; the photo pair's ``layer1`` output."""
  x = jnp.asarray(photo)
  model = models.resnet18(**models.paper_variant())
  variables = scale_branches(model.init(jax.random.key(0), x), 0.3)
  return model, variables, x, peel_jax.features(model, variables, x, "layer1")["layer1"]


@pytest.fixture(scope="module")
def run40(net):
  """From image 0's ``layer1``: the start (0 steps) and 40 steps of the default method."""
  model, variables, _, obs = net
  start = mahendran_vedaldi(model, variables, obs[:1], "layer1", key=KEY, steps=0)
  end = mahendran_vedaldi(model, variables, obs[:1], "layer1", key=KEY, steps=40)
  return start, end


def test_objective_and_residual_fall(run40):
  (x0, info0), (x, info) = run40
  assert x.shape == (1, 96, 96, 3) and np.isfinite(np.asarray(x)).all()
  assert int(info.steps[0]) == 40 and int(info0.steps[0]) == 0
  assert float(info0.residual[0]) > 0.5  # noise explains little of the observation
  assert float(info.residual[0]) < 0.15 * float(info0.residual[0]), (info0, info)
  assert float(info.objective[0]) < 0.05 * float(info0.objective[0])
  np.testing.assert_allclose(info.residual**2, info.data, rtol=1e-3)
  np.testing.assert_allclose(info.objective, info.data + 1e-3 * info.alpha_term + 1e-3 * info.tv_term, rtol=1e-5)


def test_box_respected(run40):
  lo, hi = images.pixel_box()
  for x, _ in run40:
    x = np.asarray(x)
    assert (x >= lo - 1e-6).all() and (x <= hi + 1e-6).all()


def test_batch_composition_does_not_change_an_image(net):
  model, variables, _, obs = net
  kw = dict(key=KEY, steps=10)
  alone, info1 = mahendran_vedaldi(model, variables, obs[:1], "layer1", **kw)
  pair, info2 = mahendran_vedaldi(model, variables, obs, "layer1", **kw)
  np.testing.assert_allclose(np.asarray(pair[0]), np.asarray(alone[0]), atol=1e-4, rtol=0)
  np.testing.assert_allclose(info2.residual[0], info1.residual[0], rtol=1e-4)
  assert not np.allclose(np.asarray(pair[1]), np.asarray(pair[0]), atol=1e-2)  # the mirrored photo differs


def test_adam_custom_box_and_single_observation(net):
  model, variables, x, _ = net
  obs = peel_jax.features(model, variables, x[:1], "relu")["relu"][0]  # one (H, W, C) observation
  img, info = mahendran_vedaldi(model, variables, obs, "relu", key=KEY, steps=4, chunk=2, optimizer="adam",
                                learning_rate=0.5, box=(-0.5, 0.5))
  assert img.shape == (96, 96, 3) and info.residual.shape == (1,)
  assert float(jnp.min(img)) >= -0.5 and float(jnp.max(img)) <= 0.5
  assert float(jnp.max(jnp.abs(img))) > 0.4  # the steps moved it to the bound somewhere


def test_bad_inputs_raise(net):
  model, variables, _, obs = net
  with pytest.raises(KeyError, match=r"valid layers: relu, maxpool, layer1, layer1\.0"):
    mahendran_vedaldi(model, variables, obs, "layer9", key=KEY)
  with pytest.raises(KeyError, match="'fc'"):
    mahendran_vedaldi(model, variables, obs, "fc", key=KEY)
  with pytest.raises(ValueError, match="has shape"):
    mahendran_vedaldi(model, variables, obs, "layer2", key=KEY)
  with pytest.raises(ValueError, match="unknown optimizer"):
    mahendran_vedaldi(model, variables, obs, "layer1", key=KEY, optimizer="lbfgs")
  with pytest.raises(ValueError, match="lambda_tv"):
    mahendran_vedaldi(model, variables, obs, "layer1", key=KEY, lambda_tv=-1.0)


def test_objective_terms_at_the_truth(net):
  model, variables, x, obs = net
  t = mv_module.objective_terms(model, variables, obs, "layer1", x)
  np.testing.assert_allclose(t["data"], 0.0, atol=1e-10)
  # The module docstring's figures for the 96x96 astronaut: R_alpha about 0.15, R_tv about 7.9.
  assert 0.1 < float(t["alpha"][0]) < 0.2 and 6.0 < float(t["tv"][0]) < 10.0
  np.testing.assert_allclose(t["tv"][1], t["tv"][0], rtol=1e-2)  # the mirrored photo: same smoothness
