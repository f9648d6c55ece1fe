"""certify_network: statuses on tiny networks whose answer is known by construction, the Lanczos estimate against a
dense SVD, starts, the report, and bad input. Images are 96 px (a 64 px image is pathologically slow in this jaxlib).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peel_jax import features, images, models
from peel_jax._certify_network import certify_network, jacobian_singular_values
from peel_jax.cli import scale_branches

SIZE = 96
PIXELS = SIZE * SIZE * 3


@pytest.fixture(scope="module")
def x2():
  """Two 96 px photos, normalised ``(2, 96, 96, 3)``."""
  return jnp.asarray(np.stack([images.normalize(images.bundled(n, SIZE)) for n in ("astronaut", "chelsea")]))


def _stem_net(x, *, live_channels=None, dead_inputs=()):
  """A small-stem paper-variant network (3x3 stride-1 stem conv, ReLU, one residual block).

  ``live_channels``: keep only these stem channels alive (the others get a bias of -1e3, so their ReLU output is 0 on
  every image in the pixel box). ``dead_inputs``: input channels whose stem weights are zero (pixels that no output
  sees: an exact null space of the Jacobian).
  """
  model = models.ResNet(stage_sizes=(1,), **models.paper_variant(small_stem=True))
  variables = model.init(jax.random.key(1), x[:1])
  conv = dict(variables["params"]["conv1"])
  if live_channels is not None:
    dead = np.ones(conv["bias"].shape, bool)
    dead[list(live_channels)] = False
    conv["bias"] = jnp.where(jnp.asarray(dead), -1e3, conv["bias"])
  for c in dead_inputs:
    conv["kernel"] = conv["kernel"].at[:, :, c, :].set(0.0)
  return model, {**variables, "params": {**variables["params"], "conv1": conv}}


def _observe(model, variables, x, layer):
  return features(model, variables, x, layer)[layer]


# --- the Lanczos estimate against a dense SVD (oracle) ---------------------------------------------------------------


def _tiny_map():
  """A ReLU layer ``relu(W x - 0.1)``, 48 inputs -> 160 outputs (about 75 active: full column rank), on a batch
  of two ``(4, 4, 3)`` inputs."""
  k1, k2 = jax.random.split(jax.random.key(0))
  w = jax.random.normal(k1, (48, 160), jnp.float32) / 5

  def f(x):
    return jax.nn.relu(x.reshape(x.shape[0], -1) @ w - 0.1)

  return f, jax.random.normal(k2, (2, 4, 4, 3), jnp.float32)


def _dense_singular_values(f, x, mask=None):
  out = []
  for i in range(x.shape[0]):
    jac = np.asarray(jax.jacfwd(lambda t: f(t[None])[0])(x[i]), np.float64).reshape(-1, x[i].size)
    if mask is not None:
      jac = jac[:, np.asarray(mask[i]).reshape(-1)]
    out.append(np.linalg.svd(jac, compute_uv=False))  # descending
  return out


def test_lanczos_brackets_and_converges_to_the_dense_svd():
  f, x = _tiny_map()
  true = _dense_singular_values(f, x)
  few = jacobian_singular_values(f, x, iters=5, n_values=3)
  full = jacobian_singular_values(f, x, iters=x[0].size, n_values=3)
  for i, s in enumerate(true):
    smallest = s[::-1]
    # Interlacing: the i-th smallest Ritz value is at least the i-th smallest singular value, the largest at most
    # the largest; the directly recomputed ||J v|| is an upper bound on sigma_min too.
    assert np.all(few["ritz"][i] >= smallest[:3] * (1 - 1e-5))
    assert few["sigma_max"][i] <= s[0] * (1 + 1e-5)
    assert few["sigma_min"][i] >= smallest[0] * (1 - 1e-5)
    assert few["ritz"][i][0] > 1.2 * smallest[0]  # 5 steps have not converged at the small end: a fact to show
    # A full Krylov space (k = dimension, full reorthogonalisation) recovers the spectrum.
    np.testing.assert_allclose(full["ritz"][i], smallest[:3], rtol=1e-4)
    np.testing.assert_allclose(full["sigma_min"][i], smallest[0], rtol=1e-4)
    np.testing.assert_allclose(full["sigma_max"][i], s[0], rtol=1e-5)


def test_lanczos_restricted_to_free_coordinates():
  f, x = _tiny_map()
  mask = np.ones(x.shape, bool)
  mask[:, :2, :, :] = False  # hold the first two rows
  true = _dense_singular_values(f, x, mask)
  got = jacobian_singular_values(f, x, jnp.asarray(mask), iters=int(mask[0].sum()), n_values=2)
  assert got["iters"] == int(mask[0].sum())
  for i, s in enumerate(true):
    np.testing.assert_allclose(got["ritz"][i], s[::-1][:2], rtol=1e-4)


# --- statuses known by construction ----------------------------------------------------------------------------------


def test_injective_small_stem_network_is_determined(x2):
  model, variables = _stem_net(x2)
  variables = scale_branches(variables, 0.3)
  obs = _observe(model, variables, x2, "layer1")
  cert = certify_network(model, variables, obs, "layer1", x2, lanczos_iters=6)
  assert cert.status == ["determined", "determined"]
  assert not cert.gated  # no post-add ReLU: signed outputs, every value an equation
  np.testing.assert_array_equal(cert.pixels, PIXELS)
  np.testing.assert_array_equal(cert.observed_values, SIZE * SIZE * 64)
  np.testing.assert_array_equal(cert.informative_values, SIZE * SIZE * 64)
  np.testing.assert_array_equal(cert.null_dim_bound, 0)
  assert np.all(cert.sigma_ratio > 1e-3)
  assert np.all(cert.observation_residual == 0.0)
  assert np.all(cert.singular_values[:, 0] <= cert.singular_values[:, -1])


def test_fewer_nonzero_outputs_than_pixels_is_underdetermined_with_the_exact_bound(x2):
  # Two live stem channels of 64: at most 2 * 96 * 96 = 18432 non-zero ReLU outputs for 27648 pixel values.
  model, variables = _stem_net(x2, live_channels=(3, 7))
  obs = _observe(model, variables, x2, "relu")
  cert = certify_network(model, variables, obs, "relu", x2, lanczos_iters=4)
  nonzero = np.count_nonzero(np.asarray(obs).reshape(2, -1), axis=1)
  assert cert.gated
  assert cert.status == ["underdetermined", "underdetermined"]
  np.testing.assert_array_equal(cert.nonzero_values, nonzero)
  np.testing.assert_array_equal(cert.informative_values, nonzero)
  np.testing.assert_array_equal(cert.null_dim_bound, PIXELS - nonzero)
  assert np.all(cert.null_dim_bound >= PIXELS - 2 * SIZE * SIZE)
  np.testing.assert_array_equal(cert.free_null_dim_bound, np.maximum(0, cert.free_pixels - nonzero))


def test_same_net_with_every_channel_alive_is_determined_by_count(x2):
  model, variables = _stem_net(x2)
  obs = _observe(model, variables, x2, "relu")
  cert = certify_network(model, variables, obs, "relu", x2, lanczos_iters=4)
  assert np.all(cert.nonzero_values > PIXELS)
  assert cert.status == ["determined", "determined"]


def test_pixels_no_output_sees_are_locally_underdetermined(x2):
  # The blue channel's stem weights are zero: J has an exact 9216-dimensional null space, while the counts (about
  # 290k non-zero outputs for 27648 pixel values) allow determinacy. Lanczos finds it: ||J v|| is 0 for a blue v.
  model, variables = _stem_net(x2, dead_inputs=(2,))
  obs = _observe(model, variables, x2[:1], "relu")
  cert = certify_network(model, variables, obs, "relu", x2[:1], lanczos_iters=16)
  assert cert.null_dim_bound[0] == 0
  assert cert.sigma_ratio[0] <= cert.null_tol
  assert cert.status == ["locally_underdetermined"]


def test_signed_outputs_count_every_value(x2):
  # The paper variant, one block per stage, at 96 px, observed at layer4: 6 x 6 x 512 = 18432 signed values (no
  # post-add ReLU: a zero would still be an equation) for 27648 pixel values. Counts only (lanczos_iters=0).
  model = models.ResNet(stage_sizes=(1, 1, 1, 1), **models.paper_variant())
  variables = model.init(jax.random.key(0), x2[:1])
  obs = _observe(model, variables, x2[:1], "layer4")
  cert = certify_network(model, variables, obs[0], "layer4", x2[0], lanczos_iters=0)
  assert not cert.gated
  d = cert.to_dict()
  assert d["status"] == "underdetermined"
  assert d["informative_values"] == d["observed_values"] == 6 * 6 * 512
  assert d["null_dim_bound"] == PIXELS - 6 * 6 * 512
  assert d["sigma_min"] is None and d["lanczos_iters"] == 0


# --- starts -----------------------------------------------------------------------------------------------------------


def test_starts_find_distinct_exact_preimages_where_pixels_are_unseen(x2):
  model, variables = _stem_net(x2, dead_inputs=(2,))
  obs = _observe(model, variables, x2[:1], "relu")
  cert = certify_network(model, variables, obs, "relu", x2[:1], lanczos_iters=2, starts=2, refine_iters=10)
  assert cert.exact_starts[0] == 3  # x_hat and both starts reproduce the observation
  assert cert.spread[0] > cert.spread_tol
  assert cert.status == ["not_injective"]


def test_starts_agree_where_the_image_is_determined(x2):
  model, variables = _stem_net(x2)
  obs = _observe(model, variables, x2[:1], "relu")
  cert = certify_network(model, variables, obs, "relu", x2[:1], lanczos_iters=2, starts=2, refine_iters=10)
  assert cert.exact_starts[0] == 3
  assert cert.spread[0] <= cert.spread_tol
  assert cert.status == ["determined"]


# --- the report and bad input ---------------------------------------------------------------------------------------


def test_to_dict_is_json_ready(x2):
  model, variables = _stem_net(x2)
  obs = _observe(model, variables, x2, "relu")
  cert = certify_network(model, variables, obs, "relu", x2, lanczos_iters=2)
  d = json.loads(json.dumps(cert.to_dict()))
  assert d["status"] == ["determined", "determined"]
  assert len(d["singular_values"]) == 2 and len(d["singular_values"][0]) == 2
  assert d["spread"] == [None, None]  # no starts
  one = json.loads(json.dumps(certify_network(model, variables, obs[0], "relu", x2[0], lanczos_iters=2).to_dict()))
  assert one["status"] == "determined" and isinstance(one["pixels"], int) and isinstance(one["sigma_min"], float)


def test_bad_input_is_refused_with_a_clear_message(x2):
  model, variables = _stem_net(x2)
  obs = _observe(model, variables, x2, "relu")
  with pytest.raises(KeyError, match=r"cannot certify layer 'layer9'; valid layers: relu, maxpool, layer1"):
    certify_network(model, variables, obs, "layer9", x2)
  with pytest.raises(ValueError, match=r"observation of shape \(96, 96, 5\) does not fit layer 'relu'"):
    certify_network(model, variables, obs[..., :5], "relu", x2)
  with pytest.raises(ValueError, match=r"observation of shape \(2, 96, 96, 64, 1\) does not fit layer 'relu'"):
    certify_network(model, variables, obs[..., None], "relu", x2)
  with pytest.raises(ValueError, match=r"x_hat of shape \(2, 48, 48, 3\) gives 'relu' outputs of shape"):
    certify_network(model, variables, obs, "relu", x2[:, :48, :48])
  with pytest.raises(ValueError, match=r"x_hat of shape \(1, 96, 96, 3\) does not fit the observation"):
    certify_network(model, variables, obs, "relu", x2[:1])
  with pytest.raises(ValueError, match="unknown box 'unit'"):
    certify_network(model, variables, obs, "relu", x2, box="unit")
