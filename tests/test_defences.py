"""peel_jax.defences: each defence does what its docstring says, per image, and rejects bad strengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peel_jax import defences


@pytest.fixture
def h():
  """Two images of features with very different scales (per-image behaviour must not mix them)."""
  a = jax.random.uniform(jax.random.key(0), (2, 6, 6, 16))
  return a * jnp.asarray([1.0, 100.0])[:, None, None, None]


def test_none_is_the_identity(h):
  np.testing.assert_array_equal(defences.apply_defence("none", 0.0, h, jax.random.key(1)), h)


def test_gaussian_noise_to_signal_ratio_is_sigma_per_image(h):
  out = defences.apply_defence("gaussian", 0.2, h, jax.random.key(1))
  for i in range(2):
    ratio = np.linalg.norm(out[i] - h[i]) / np.linalg.norm(h[i])
    assert ratio == pytest.approx(0.2, rel=0.1)
  np.testing.assert_array_equal(defences.gaussian_noise(h, 0.0, jax.random.key(1)), h)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantisation_has_2_to_the_bits_levels_and_bounded_error(h, bits):
  out = np.asarray(defences.apply_defence("quantize", bits, h, jax.random.key(1)))
  for i in range(2):
    lo, hi = float(h[i].min()), float(h[i].max())
    step = (hi - lo) / (2**bits - 1)
    assert len(np.unique(np.round((out[i] - lo) / step).astype(int))) <= 2**bits
    assert np.max(np.abs(out[i] - np.asarray(h[i]))) <= step / 2 * (1 + 1e-5)
    assert out[i].min() == pytest.approx(lo, rel=1e-6) and out[i].max() == pytest.approx(hi, rel=1e-6)


def test_channel_dropout_zeroes_whole_channels_and_keeps_expectation(h):
  big = jnp.ones((64, 4, 4, 32))
  out = np.asarray(defences.apply_defence("dropout", 0.25, big, jax.random.key(2)))
  per_channel = out.reshape(64, 16, 32)
  assert np.all(per_channel.min(1) == per_channel.max(1))  # a channel is dropped or kept as a whole
  kept = per_channel[:, 0, :] > 0
  assert kept.mean() == pytest.approx(0.75, abs=0.03)
  np.testing.assert_allclose(per_channel[:, 0, :][kept], 1 / 0.75, rtol=1e-6)
  assert out.mean() == pytest.approx(1.0, abs=0.05)


def test_bad_strengths_and_kinds_are_named():
  h = jnp.ones((1, 2, 2, 3))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="unknown defence 'blur'"):
    defences.apply_defence("blur", 1.0, h, key)
  with pytest.raises(ValueError, match="integer number of bits"):
    defences.apply_defence("quantize", 2.5, h, key)
  with pytest.raises(ValueError, match="0 <= p < 1"):
    defences.apply_defence("dropout", 1.0, h, key)
  with pytest.raises(ValueError, match="sigma >= 0"):
    defences.apply_defence("gaussian", -1.0, h, key)
