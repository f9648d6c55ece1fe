"""The plan of a backward pass: which units are inverted, in which order, and the helpers every pass shares.

A plan walks from the observed ``layer`` back to the pixels: the deepest observed block first, every stage from its
last block to its first, then the stem. With ``driver='scan'`` a stage's identical blocks after the first are one
unit (stacked parameters for ``lax.scan``). Nothing here solves anything; :mod:`peel_jax.baselines` import these
helpers too (they import nothing private from the attack).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from peel_jax import blocks as _blocks
from peel_jax import images as _images
from peel_jax._features import features
from peel_jax.blocks import Block
from peel_jax.problems.stem import unpooled
from peel_jax.solver.info import relative_error


def invertible_layers(model) -> list[str]:
  """Names :func:`peel_jax.invert_network` accepts as ``layer``: ``'relu'`` (pre-pool stem), ``'maxpool'``, every
  ``'layerK'`` and ``'layerK.J'``."""
  names = ["relu", "maxpool"]
  for s, n in enumerate(model.stage_sizes):
    names += [f"layer{s + 1}"] + [f"layer{s + 1}.{b}" for b in range(n)]
  return names


def check_layer(model, layer: str) -> None:
  """Raises ``KeyError`` (listing the valid names) unless ``layer`` is one of :func:`invertible_layers`."""
  valid = invertible_layers(model)
  if layer not in valid:
    raise KeyError(f"cannot invert from layer {layer!r}; valid layers: {', '.join(valid)}")


def depth(model, layer: str) -> tuple[int, int]:
  """``(stage, last block index)`` of the deepest block observed at ``layer`` (``(-1, -1)`` for the stem)."""
  if layer in ("relu", "maxpool"):
    return -1, -1
  head, _, tail = layer.partition(".")
  s = int(head[len("layer"):]) - 1
  return s, (int(tail) if tail else model.stage_sizes[s] - 1)


def input_name(model, stage: int, index: int) -> str:
  """The feature name of the input of block ``layer{stage+1}.{index}``."""
  if index > 0:
    return f"layer{stage + 1}.{index - 1}"
  if stage == 0:
    return "maxpool"
  return f"layer{stage}.{model.stage_sizes[stage - 1] - 1}"


def full_box(box, shape, dtype):
  """``box`` as two arrays of the input shape of ONE image (per-channel or scalar bounds broadcast), or ``None``.

  Raises:
    ValueError: a string other than ``'imagenet'``.
  """
  if box is None:
    return None
  if isinstance(box, str):
    if box != "imagenet":
      raise ValueError(f"unknown box {box!r}; pass 'imagenet', None or (lo, hi)")
    box = _images.pixel_box()
  lo, hi = (jnp.broadcast_to(jnp.asarray(b, dtype), shape) for b in box)
  return lo, hi


def stem_of(model, variables, layer: str) -> Block:
  """The stem block as observed from ``layer`` (unpooled when ``layer == 'relu'``)."""
  stem = _blocks.stem_block(model, variables)
  return unpooled(stem) if layer == "relu" else stem


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def observation_residual(model, variables, layer, x, y):
  """``||f(x) - y|| / ||y||`` per image, ``f`` the network up to ``layer``; ``x`` ``(N, H, W, 3)``."""
  return relative_error(features(model, variables, x, layer)[layer], y)


def image_shape(model, variables, layer: str, observed_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The input shape ``(N, H, W, 3)`` whose ``layer`` output has ``observed_shape`` (batched), walking the blocks
  back (each stride-``s`` block multiplies the size by ``s``)."""
  stage, _ = depth(model, layer)
  shape = tuple(observed_shape)
  for s in range(stage, -1, -1):
    shape = _blocks.residual_block(model, variables, s, 0).input_shape(shape)
  return stem_of(model, variables, layer).input_shape(shape)


class Unit(NamedTuple):
  """One step of the backward pass.

  Attributes:
    block: the block (``scan``: the stacked blocks ``first..last``, parameters along axis 0).
    stage: 0-based stage index.
    first, last: block indices covered (equal for a single block).
    scan: whether this unit is a ``lax.scan`` over stacked blocks.
  """

  block: Block
  stage: int
  first: int
  last: int
  scan: bool

  @property
  def size(self) -> int:
    return self.last - self.first + 1


def plan(model, variables, layer: str, driver: str) -> list[Unit]:
  """The residual-block units from ``layer`` back to the stem's output, in inversion order (deepest first)."""
  stage, last = depth(model, layer)
  units = []
  for s in range(stage, -1, -1):
    top = last if s == stage else model.stage_sizes[s] - 1
    st = _blocks.stage_blocks(model, variables, s)
    if driver == "scan" and top >= 1:
      rest = st.rest.with_params(jax.tree.map(lambda a: a[:top], st.rest.params))
      units.append(Unit(rest, s, 1, top, True))
    else:
      # The stacked spec's name for every rest block: one compiled solver serves the whole stage.
      units += [Unit(Block(_blocks.residual_block(model, variables, s, b).params, st.rest.spec), s, b, b, False)
                for b in range(top, 0, -1)]
    units.append(Unit(st.first, s, 0, 0, False))
  return units


def block_key(model, key, stage: int, index: int):
  """The PRNG key of block ``layer{stage+1}.{index}``, the same whichever the driver."""
  return jax.random.fold_in(key, 1 + sum(model.stage_sizes[:stage]) + index)
