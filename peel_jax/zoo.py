"""A shared zoo of block-inversion problems (after optimistix's test zoo), used by tests and benchmarks.

Blocks have He-normal weights (``std = sqrt(2 / fan_in)``, the scale at which a residual branch has gain about 1)
and small random biases; ``branch_gain`` scales the branch's last affine map (0.3 makes the paper block a
contraction, as trained residual branches mostly are: see DESIGN.md). Inputs are ReLU features of a real photo
(scikit-image's astronaut, bundled in its wheel), so they have the sparsity and statistics of real activations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peel_jax.blocks import Block, BlockSpec

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

PROBLEM_KINDS = ("paper", "basic", "basic_down", "bottleneck", "preact", "leaky_relu", "prelu", "gelu")


class BlockProblem(NamedTuple):
  """A block, a batch of true inputs and their outputs."""

  block: Block
  x: jax.Array  # (N, H, W, Cin)
  y: jax.Array  # (N, Ho, Wo, Cout)
  name: str


def photo(size: int, name: str = "astronaut", crop: int | None = None) -> np.ndarray:
  """A bundled photo as a float32 ``(size, size, 3)`` array in [0, 1]."""
  from skimage import data, transform

  img = {"astronaut": data.astronaut, "chelsea": data.chelsea, "coffee": data.coffee}[name]()
  img = img.astype(np.float32) / 255.0
  if crop:
    img = img[:crop, :crop]
  return transform.resize(img, (size, size), anti_aliasing=True).astype(np.float32)


def normalize(img: np.ndarray) -> np.ndarray:
  """ImageNet mean/std normalisation (channels last)."""
  return (img - IMAGENET_MEAN) / IMAGENET_STD


def _he(key, k, cin, cout, groups=1):
  return jax.random.normal(key, (k, k, cin // groups, cout)) * np.sqrt(2.0 / (k * k * cin // groups))


def _affine(key, k, cin, cout, gain=1.0, groups=1):
  k1, k2 = jax.random.split(key)
  return {"kernel": gain * _he(k1, k, cin, cout, groups), "bias": 0.01 * jax.random.normal(k2, (cout,))}


def random_block(key, kind: str, channels: int = 16, branch_gain: float = 1.0) -> Block:
  """A random folded block of ``kind`` (one of :data:`PROBLEM_KINDS`) on ``channels`` input channels."""
  ks = jax.random.split(key, 6)
  c = channels
  act, post, nonneg = "relu", True, True
  if kind == "paper":  # the paper's toy: inputs are ReLU features of a photo, so x >= 0 is known
    post = False
  if kind in ("leaky_relu", "prelu", "gelu"):
    post, nonneg = False, False
  if kind in ("leaky_relu", "prelu", "gelu"):
    act, post = kind, True
  params: dict = {}
  if kind == "bottleneck":
    w = max(c // 4, 1)
    params["convs"] = (_affine(ks[0], 1, c, w), _affine(ks[1], 3, w, w), _affine(ks[2], 1, w, c, branch_gain))
    spec = dict(kind="bottleneck", kernels=(1, 3, 1), strides=(1, 1, 1), groups=(1, 1, 1), shortcut="identity",
                stride=1, out_channels=c)
  elif kind == "basic_down":
    params["convs"] = (_affine(ks[0], 3, c, 2 * c), _affine(ks[1], 3, 2 * c, 2 * c, branch_gain))
    params["shortcut"] = _affine(ks[2], 1, c, 2 * c)
    spec = dict(kind="basic", kernels=(3, 3), strides=(2, 1), groups=(1, 1), shortcut="conv", stride=2,
                out_channels=2 * c)
  elif kind == "preact":
    params["convs"] = (_affine(ks[0], 3, c, c), _affine(ks[1], 3, c, c, branch_gain))
    params["pre"] = {"scale": 1.0 + 0.1 * jax.random.normal(ks[3], (c,)), "bias": 0.1 * jax.random.normal(ks[4], (c,))}
    spec = dict(kind="preact", kernels=(3, 3), strides=(1, 1), groups=(1, 1), shortcut="identity", stride=1,
                out_channels=c)
    post, nonneg = False, False
  else:
    params["convs"] = (_affine(ks[0], 3, c, c), _affine(ks[1], 3, c, c, branch_gain))
    spec = dict(kind="basic", kernels=(3, 3), strides=(1, 1), groups=(1, 1), shortcut="identity", stride=1,
                out_channels=c)
  if act == "prelu":
    params["slopes"] = {s: jnp.asarray([0.25], jnp.float32) for s in ("act1", "act2")}
  bs = BlockSpec(name=f"zoo.{kind}", activation=act, post_activation=post, input_nonneg=nonneg, in_channels=c, **spec)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  return Block(params=params, spec=bs)


def photo_features(key, n: int, size: int, channels: int, nonneg: bool = True) -> jax.Array:
  """``n`` inputs ``(n, size, size, channels)``: ReLU features (He 3x3 conv) of crops of a bundled photo."""
  base = normalize(photo(2 * size))
  k_conv, k_crop = jax.random.split(key)
  offs = np.asarray(jax.random.randint(k_crop, (n, 2), 0, size + 1))
  crops = np.stack([base[i:i + size, j:j + size] for i, j in offs])
  w = _he(k_conv, 3, 3, channels)
  feats = jax.lax.conv_general_dilated(jnp.asarray(crops), w, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(feats) if nonneg else feats


def block_problem(kind: str, *, channels: int = 16, size: int = 16, n: int = 4, branch_gain: float = 1.0,
                  seed: int = 0) -> BlockProblem:
  """A :class:`BlockProblem`: a random block of ``kind`` and ``n`` photo-feature inputs of ``size`` x ``size``."""
  kb, kx = jax.random.split(jax.random.key(seed))
  block = random_block(kb, kind, channels, branch_gain)
  x = photo_features(kx, n, size, channels, nonneg=True)
  if not block.spec.input_nonneg and kind != "paper":
    x = x - jnp.mean(x, axis=(1, 2), keepdims=True)  # signed inputs where the architecture allows them
  y = block(x)
  return BlockProblem(block, x, y, f"{kind}/c{channels}/s{size}/g{branch_gain}")
