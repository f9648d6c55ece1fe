"""Defences a client can apply to the features it shares, before an honest-but-curious server sees them.

PEEL (arXiv 2504.06410) leaves defences open. These are the three simplest inference-time ones, each a pure
function of a batch of features ``h`` ``(N, H, W, C)`` and an explicit PRNG key, applied per image:

* ``gaussian``: ``h + sigma * rms(h) * N(0, I)``, with ``rms(h)`` the root mean square of that image's features, so
  ``strength = sigma`` is a noise-to-signal ratio.
* ``quantize``: uniform quantisation to ``2**bits`` levels between the image's minimum and maximum feature
  (``strength = bits``, an integer >= 1); the levels are the interval's ends and the points evenly between them.
* ``dropout``: every channel of an image is zeroed with probability ``p`` (``strength = p`` in ``[0, 1)``) and the
  kept ones are scaled by ``1 / (1 - p)``, so each feature keeps its expectation.

``none`` returns ``h`` unchanged. How much each costs the network's accuracy, and how much it lowers PEEL's
reconstruction quality, is measured by ``python -m experiments.defences``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFENCES = ("none", "gaussian", "quantize", "dropout")


def _per_image(v: jax.Array, ndim: int) -> jax.Array:
  return jnp.reshape(v, (-1,) + (1,) * (ndim - 1))


def gaussian_noise(h: jax.Array, sigma: float, key: jax.Array) -> jax.Array:
  """``h + sigma * rms(h) * N(0, I)`` per image (see the module docstring)."""
  if sigma < 0:
    raise ValueError(f"gaussian noise needs sigma >= 0, got {sigma}")
  rms = jnp.sqrt(jnp.mean(h.reshape(h.shape[0], -1) ** 2, axis=1))
  return h + sigma * _per_image(rms, h.ndim) * jax.random.normal(key, h.shape, h.dtype)


def quantize(h: jax.Array, bits: int) -> jax.Array:
  """Uniform quantisation of each image's features to ``2**bits`` levels over its own ``[min, max]``."""
  if int(bits) != bits or bits < 1:
    raise ValueError(f"quantisation needs an integer number of bits >= 1, got {bits}")
  flat = h.reshape(h.shape[0], -1)
  lo, hi = (_per_image(f(flat, axis=1), h.ndim) for f in (jnp.min, jnp.max))
  step = jnp.where(hi > lo, (hi - lo) / (2 ** int(bits) - 1), 1.0)
  return lo + jnp.round((h - lo) / step) * step


def channel_dropout(h: jax.Array, p: float, key: jax.Array) -> jax.Array:
  """Zeroes each channel of each image with probability ``p``; scales the kept ones by ``1 / (1 - p)``."""
  if not 0 <= p < 1:
    raise ValueError(f"channel dropout needs 0 <= p < 1, got {p}")
  keep = jax.random.bernoulli(key, 1.0 - p, (h.shape[0],) + (1,) * (h.ndim - 2) + (h.shape[-1],))
  return jnp.where(keep, h / (1.0 - p), jnp.zeros((), h.dtype))


def apply_defence(kind: str, strength: float, h: jax.Array, key: jax.Array) -> jax.Array:
  """Applies defence ``kind`` (one of :data:`DEFENCES`) of the given ``strength`` to a batch ``h``.

  Raises:
    ValueError: an unknown kind, or a strength outside the defence's range.
  """
  if kind == "none":
    return h
  if kind == "gaussian":
    return gaussian_noise(h, strength, key)
  if kind == "quantize":
    return quantize(h, strength)
  if kind == "dropout":
    return channel_dropout(h, strength, key)
  raise ValueError(f"unknown defence {kind!r}; expected one of {DEFENCES}")
