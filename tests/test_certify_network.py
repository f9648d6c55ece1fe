"""certify_network: statuses on tiny networks whose answer is known by construction, the Lanczos estimate against a
dense SVD, starts, the report, and bad input. Images are 96 px (a 64 px image is pathologically slow in this jaxlib).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peel_jax import images, models
from peel_jax._certify_network import _observe as _observe_jit
from peel_jax._certify_network import (certify_network, gated_layers_before, jacobian_singular_values,
                                      path_informative_values)
from peel_jax.cli import scale_branches

SIZE = 96
PIXELS = SIZE * SIZE * 3
K = 32  # Lanczos steps of every stem-network test: one compilation serves them all


@pytest.fixture(scope="module")
def x2():
  """Two 96 px photos, normalised ``(2, 96, 96, 3)``."""
  return jnp.asarray(np.stack([images.normalize(images.bundled(n, SIZE)) for n in ("astronaut", "chelsea")]))


def _numpy_init(model, x, seed=0):
  """He-normal (fan-out) kernels, small biases, identity BatchNorm, drawn with numpy: ``model.init`` compiles a
  random-number program per weight shape, seconds of CPU for a ResNet."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1] if len(leaf.shape) == 4 else leaf.shape[-1]
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_out), leaf.shape), leaf.dtype)
    if "scale" in name or "var" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    if "bias" in name:
      return jnp.asarray(rng.normal(0.0, 0.01, leaf.shape), leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _stem_net(x, *, live_channels=None, dead_inputs=(), small_stem=False):
  """A paper-variant network with one residual block: stem conv (7x7 stride 2, or 3x3 stride 1 with
  ``small_stem``), ReLU, no pooling.

  ``live_channels``: keep only these stem channels alive (the others get a bias of -1e3, so their ReLU output is 0 on
  every image in the pixel box). ``dead_inputs``: input channels whose stem weights are zero (pixels that no output
  sees: an exact null space of the Jacobian).
  """
  model = models.ResNet(stage_sizes=(1,), **models.paper_variant(small_stem=small_stem))
  variables = _numpy_init(model, x[:1], seed=1)
  conv = dict(variables["params"]["conv1"])
  if live_channels is not None:
    dead = np.ones(conv["bias"].shape, bool)
    dead[list(live_channels)] = False
    conv["bias"] = jnp.where(jnp.asarray(dead), -1e3, conv["bias"])
  for c in dead_inputs:
    conv["kernel"] = conv["kernel"].at[:, :, c, :].set(0.0)
  return model, {**variables, "params": {**variables["params"], "conv1": conv}}


def _observe(model, variables, x, layer):
  return _observe_jit(model, variables, layer, x)  # the library's jitted forward: its compilation is shared


# --- the Lanczos estimate against a dense SVD (oracle) ---------------------------------------------------------------


def _tiny_map():
  """A ReLU layer ``relu(W^T x - 0.1)``, 48 inputs -> 160 outputs (about 75 active: full column rank), on a batch
  of two ``(4, 4, 3)`` inputs; returns ``(f, x, dense Jacobians (2, 160, 48))``."""
  rng = np.random.default_rng(0)
  w = (rng.normal(size=(48, 160)) / 5).astype(np.float32)
  x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)

  def f(t):
    return jax.nn.relu(t.reshape(t.shape[0], -1) @ jnp.asarray(w) - 0.1)

  active = (x.reshape(2, -1).astype(np.float64) @ w - 0.1) > 0
  return f, jnp.asarray(x), active[:, :, None] * w.T.astype(np.float64)[None]


def _dense_singular_values(jac, mask=None):
  """Singular values of each image's Jacobian (over the masked inputs), descending."""
  out = []
  for i in range(jac.shape[0]):
    j = jac[i] if mask is None else jac[i][:, np.asarray(mask[i]).reshape(-1)]
    out.append(np.linalg.svd(j, compute_uv=False))
  return out


def test_lanczos_brackets_and_converges_to_the_dense_svd():
  f, x, jac = _tiny_map()
  true = _dense_singular_values(jac)
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
  f, x, jac = _tiny_map()
  mask = np.ones(x.shape, bool)
  mask[:, :2, :, :] = False  # hold the first two rows
  true = _dense_singular_values(jac, mask)
  got = jacobian_singular_values(f, x, jnp.asarray(mask), iters=int(mask[0].sum()), n_values=2)
  assert got["iters"] == int(mask[0].sum())
  for i, s in enumerate(true):
    np.testing.assert_allclose(got["ritz"][i], s[::-1][:2], rtol=1e-4)


# --- statuses known by construction ----------------------------------------------------------------------------------


def test_injective_small_stem_network_is_determined(x2):
  model, variables = _stem_net(x2, small_stem=True)
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
  # Two live stem channels of 64: at most 2 * 48 * 48 = 4608 non-zero ReLU outputs for 27648 pixel values.
  model, variables = _stem_net(x2, live_channels=(3, 7))
  obs = _observe(model, variables, x2, "relu")
  cert = certify_network(model, variables, obs, "relu", x2, lanczos_iters=K)
  nonzero = np.count_nonzero(np.asarray(obs).reshape(2, -1), axis=1)
  assert cert.gated
  assert cert.status == ["underdetermined", "underdetermined"]
  np.testing.assert_array_equal(cert.nonzero_values, nonzero)
  np.testing.assert_array_equal(cert.informative_values, nonzero)
  np.testing.assert_array_equal(cert.null_dim_bound, PIXELS - nonzero)
  assert np.all(cert.null_dim_bound >= PIXELS - 2 * (SIZE // 2) ** 2)
  np.testing.assert_array_equal(cert.free_null_dim_bound, np.maximum(0, cert.free_pixels - nonzero))


@pytest.fixture(scope="module")
def alive(x2):
  """The stem network with every channel alive, its observation at ``relu`` and its certificate."""
  model, variables = _stem_net(x2)
  obs = _observe(model, variables, x2, "relu")
  return model, variables, obs, certify_network(model, variables, obs, "relu", x2, lanczos_iters=K, n_values=2)


def test_same_net_with_every_channel_alive_is_determined_by_count(alive):
  *_, cert = alive
  assert np.all(cert.nonzero_values > PIXELS)
  np.testing.assert_array_equal(cert.null_dim_bound, 0)
  assert np.all(cert.sigma_ratio > 1e-2)
  assert cert.status == ["determined", "determined"]


def test_pixels_no_output_sees_are_locally_underdetermined(x2):
  # The blue channel's stem weights are zero: J has an exact 9216-dimensional null space, while the counts (about
  # 70k non-zero outputs for 27648 pixel values) allow determinacy. Lanczos finds it: ||J v|| is 0 for a blue v.
  # (Measured: 16 steps leave the ratio at 2e-4, 24 at 4e-6 to 9e-6, 32 at 1e-7 to 3e-7: "determined" after too
  # few steps is a false negative the module docstring warns of.)
  model, variables = _stem_net(x2, dead_inputs=(2,))
  obs = _observe(model, variables, x2, "relu")
  cert = certify_network(model, variables, obs, "relu", x2, lanczos_iters=K)
  np.testing.assert_array_equal(cert.null_dim_bound, 0)
  assert np.all(cert.sigma_ratio <= cert.null_tol)
  assert cert.status == ["locally_underdetermined", "locally_underdetermined"]


def test_signed_outputs_count_every_value(x2):
  # The paper variant, one block per stage, at 96 px, observed at layer4: 6 x 6 x 512 = 18432 signed values (no
  # post-add ReLU: a zero would still be an equation) for 27648 pixel values. Counts only (lanczos_iters=0).
  model = models.ResNet(stage_sizes=(1, 1, 1, 1), **models.paper_variant())
  variables = _numpy_init(model, x2[:1])
  obs = _observe(model, variables, x2[:1], "layer4")
  cert = certify_network(model, variables, obs[0], "layer4", x2[0], lanczos_iters=0)
  assert not cert.gated
  d = cert.to_dict()
  assert d["status"] == "underdetermined"
  assert d["informative_values"] == d["observed_values"] == 6 * 6 * 512
  assert d["null_dim_bound"] == PIXELS - 6 * 6 * 512
  assert d["sigma_min"] is None and d["lanczos_iters"] == 0


def test_layer_lists_on_the_path():
  tv = models.resnet18()
  assert gated_layers_before(tv, "maxpool") == ["relu"]
  assert gated_layers_before(tv, "layer1") == ["relu", "maxpool", "layer1.0"]
  assert gated_layers_before(tv, "layer2.1") == ["relu", "maxpool", "layer1.0", "layer1.1", "layer2.0"]
  # the paper variant's blocks have no post-add ReLU: only the stem's outputs are gated
  assert gated_layers_before(models.resnet18(**models.paper_variant()), "layer3") == ["relu", "maxpool"]


def test_a_pool_before_a_wider_layer_is_locally_underdetermined_by_the_path_count(x2):
  # A torchvision bottleneck stage (BatchNorm, max-pool, post-add ReLU) at 96 px, with 16 of its 64 stem channels
  # alive: the pool has at most 16 * 24 * 24 = 9216 non-zero values for 27648 pixel values, so rank J <= 9216 at
  # every image, while layer1 has 256 * 24 * 24 values, far more of them non-zero than pixels: the observation's
  # count allows determinacy and only the count at the pool sees the null space. Overlapping windows share maxima,
  # so the pool's rank is bounded by the distinct positions holding one, fewer still (a loop oracle).
  model = models.ResNet(stage_sizes=(1,), block="bottleneck")
  variables = _numpy_init(model, x2[:1], seed=2)
  bn1 = dict(variables["params"]["bn1"])
  bn1["bias"] = jnp.where(jnp.arange(64) < 16, bn1["bias"], -1e3)
  variables = {**variables, "params": {**variables["params"], "bn1": bn1}}
  obs = _observe(model, variables, x2, "layer1")
  pool = np.asarray(_observe(model, variables, x2, "maxpool")).reshape(2, -1, 64)
  pool_nonzero = np.count_nonzero(pool.reshape(2, -1), axis=1)
  sources = _max_pool_sources_oracle(np.asarray(_observe(model, variables, x2, "relu")))
  assert np.all(pool[..., 16:] == 0) and np.all(sources < pool_nonzero) and np.all(pool_nonzero <= 16 * 24 * 24)
  cert = certify_network(model, variables, obs, "layer1", x2, lanczos_iters=0)
  assert cert.gated and np.all(cert.nonzero_values > PIXELS)
  np.testing.assert_array_equal(cert.null_dim_bound, 0)
  assert cert.path_layer == ["maxpool", "maxpool"]
  np.testing.assert_array_equal(cert.path_informative_values, sources)
  np.testing.assert_array_equal(cert.path_null_dim_bound, PIXELS - sources)
  assert cert.status == ["locally_underdetermined", "locally_underdetermined"]
  d = json.loads(json.dumps(cert.to_dict()))
  assert d["path_layer"] == ["maxpool", "maxpool"] and d["path_null_dim_bound"] == (PIXELS - sources).tolist()
  # observed at the pool itself, its distinct maxima at the point are on the path too
  counts, names = path_informative_values(model, variables, "maxpool", x2)
  assert names == ["relu", "maxpool"]
  np.testing.assert_array_equal(counts[:, 1], sources)


def _max_pool_sources_oracle(r: np.ndarray) -> np.ndarray:
  """Per image, the distinct (position, channel) of ``r`` ``(N, H, W, C)`` holding a positive maximum of a 3x3/2
  window (padding 1), by a loop over the windows."""
  n, h, w, c = r.shape
  out = []
  for k in range(n):
    held = set()
    for i in range(0, h, 2):
      for j in range(0, w, 2):
        win = r[k, max(0, i - 1):i + 2, max(0, j - 1):j + 2]  # (3, 3, C) at most
        flat = win.reshape(-1, c)
        for ch in np.nonzero(flat.max(axis=0) > 0)[0]:
          a = int(np.argmax(flat[:, ch]))
          held.add((max(0, i - 1) + a // win.shape[1], max(0, j - 1) + a % win.shape[1], int(ch)))
    out.append(len(held))
  return np.asarray(out)


# --- starts -----------------------------------------------------------------------------------------------------------


def test_starts_find_distinct_exact_preimages_where_pixels_are_unseen(x2):
  model, variables = _stem_net(x2, dead_inputs=(2,))
  obs = _observe(model, variables, x2, "relu")
  cert = certify_network(model, variables, obs, "relu", x2, lanczos_iters=0, starts=2, refine_iters=6)
  np.testing.assert_array_equal(cert.exact_starts, 3)  # x_hat and both starts reproduce the observation
  assert np.all(cert.spread > cert.spread_tol)
  assert cert.status == ["not_injective", "not_injective"]  # found distinct preimages outrank a small singular value


def test_starts_agree_where_the_image_is_determined(alive, x2):
  model, variables, obs, _ = alive
  cert = certify_network(model, variables, obs, "relu", x2, lanczos_iters=0, starts=2, refine_iters=6)
  np.testing.assert_array_equal(cert.exact_starts, 3)
  assert np.all(cert.spread <= cert.spread_tol)
  assert cert.status == ["determined", "determined"]


def test_without_x_hat_the_attack_supplies_the_estimate(alive, x2, monkeypatch):
  # The estimate comes from peel_jax.invert_network(model, variables, observed, layer), with network_config passed
  # as its config; a stub stands in for the attack (its cost and accuracy are tested elsewhere).
  import peel_jax

  model, variables, obs, _ = alive
  calls = []

  def stub(*args, **kwargs):
    calls.append((args, kwargs))
    return x2 + 0.0, None

  monkeypatch.setattr(peel_jax, "invert_network", stub)
  cert = certify_network(model, variables, obs, "relu", lanczos_iters=0)
  assert len(calls) == 1 and calls[0][0][0] is model and calls[0][0][3] == "relu" and calls[0][1] == {}
  np.testing.assert_array_equal(cert.observation_residual, 0.0)
  sentinel = object()
  certify_network(model, variables, obs, "relu", lanczos_iters=0, network_config=sentinel)
  assert calls[1][1] == {"config": sentinel}


# --- the report and bad input ---------------------------------------------------------------------------------------


def test_to_dict_is_json_ready(alive, x2):
  model, variables, obs, cert = alive
  d = json.loads(json.dumps(cert.to_dict()))
  assert d["status"] == ["determined", "determined"]
  assert len(d["singular_values"]) == 2 and len(d["singular_values"][0]) == 2
  assert d["spread"] == [None, None]  # no starts
  assert d["lanczos_iters"] == K and d["null_tol"] == 1e-5
  one = certify_network(model, variables, obs[0], "relu", x2[0], lanczos_iters=0).to_dict()
  one = json.loads(json.dumps(one))
  assert one["status"] == "determined" and one["pixels"] == PIXELS and one["spread"] is None
  assert one["sigma_min"] is None and one["singular_values"] == []


def test_bad_input_is_refused_with_a_clear_message(alive, x2):
  model, variables, obs, _ = alive
  with pytest.raises(KeyError, match=r"cannot certify layer 'layer9'; valid layers: relu, maxpool, layer1"):
    certify_network(model, variables, obs, "layer9", x2)
  with pytest.raises(ValueError, match=r"observation of shape \(48, 48, 5\) does not fit layer 'relu'"):
    certify_network(model, variables, obs[..., :5], "relu", x2)
  with pytest.raises(ValueError, match=r"observation of shape \(2, 48, 48, 64, 1\) does not fit layer 'relu'"):
    certify_network(model, variables, obs[..., None], "relu", x2)
  with pytest.raises(ValueError, match=r"x_hat of shape \(2, 48, 48, 3\) gives 'relu' outputs of shape"):
    certify_network(model, variables, obs, "relu", x2[:, :48, :48])
  with pytest.raises(ValueError, match=r"x_hat of shape \(1, 96, 96, 3\) does not fit the observation"):
    certify_network(model, variables, obs, "relu", x2[:1])
  with pytest.raises(ValueError, match="unknown box 'unit'"):
    certify_network(model, variables, obs, "relu", x2, box="unit")
