"""``invert_block``: recover a block's input from its output, per image, batched."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from peel_jax.blocks import KINDS, Block
from peel_jax.solver import info as _info
from peel_jax.solver.config import SolverConfig
from peel_jax.problems.block import solve_batch


def _is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def validate_observation(block: Block, y, *, x0=None, box=None):
  """Checks ``y`` (and ``x0``) against ``block`` before anything compiles; returns ``(y, x0, batched)``.

  Accepts a batch ``(N, Ho, Wo, Co)`` or one image ``(Ho, Wo, Co)`` (returned results are then unbatched too).

  Raises:
    TypeError: ``block`` is not a :class:`peel_jax.blocks.Block`.
    ValueError: an unknown block kind, a shape that does not fit the block, a non-finite value in ``y``, negative
      values in ``y`` where the block ends in a ReLU, or an ``x0`` of the wrong shape.
  """
  if not isinstance(block, Block):
    raise TypeError(f"expected a peel_jax.blocks.Block (see peel_jax.blocks.extract), got {type(block).__name__}")
  if block.spec.kind not in KINDS:
    raise ValueError(f"unknown block kind {block.spec.kind!r}; expected one of {KINDS}")
  y = jnp.asarray(y)
  if not jnp.issubdtype(y.dtype, jnp.floating):
    raise ValueError(f"y must be a floating-point array, got dtype {y.dtype}")
  if y.ndim not in (3, 4):
    raise ValueError(f"y must be (N, H, W, C) or (H, W, C), got shape {y.shape}")
  if 0 in y.shape:
    raise ValueError(f"y has an empty dimension: shape {tuple(y.shape)}")
  batched = y.ndim == 4
  if not batched:
    y = y[None]
  name = block.spec.name or block.spec.kind
  if y.shape[-1] != block.spec.out_channels:
    raise ValueError(
        f"y has {y.shape[-1]} channels (shape {tuple(y.shape)}) but block {name!r} outputs "
        f"{block.spec.out_channels} channels"
    )
  in_shape = block.input_shape(y.shape)
  expected = tuple(block.output_shape(in_shape))
  if expected != tuple(y.shape):
    raise ValueError(f"y has shape {tuple(y.shape)}, which block {name!r} cannot produce (nearest: {expected})")
  if _is_concrete(y):
    ya = np.asarray(y)
    bad = ~np.isfinite(ya)
    if bad.any():
      imgs = sorted(set(np.nonzero(bad.reshape(bad.shape[0], -1).any(1))[0].tolist()))
      raise ValueError(f"y has {int(bad.sum())} non-finite value(s) (NaN/inf) in image(s) {imgs}")
    if block.spec.post_activation and block.spec.activation == "relu" and (ya < 0).any():
      raise ValueError(
          f"y has negative values but block {name!r} ends in a ReLU: it cannot be this block's output "
          f"(min {float(ya.min()):.3g})"
      )
  if x0 is not None:
    x0 = jnp.asarray(x0, y.dtype)
    if not batched:
      x0 = x0[None]
    if tuple(x0.shape) != tuple(in_shape):
      raise ValueError(f"x0 has shape {tuple(x0.shape)}; block {name!r} needs inputs of shape {tuple(in_shape)}")
  return y, x0, batched


def invert_block(
    block: Block,
    y: jax.Array,
    *,
    x0: jax.Array | None = None,
    key: jax.Array | None = None,
    config: SolverConfig | None = None,
    box: tuple[float, float] | None = None,
) -> tuple[jax.Array, _info.InversionInfo]:
  """Recovers the input of ``block`` from its output ``y``, one independent problem per image.

  Solves, per image, the paper's lifted problem (see :mod:`peel_jax.solver`): find ``x`` with ``block(x) = y``
  subject to what the architecture guarantees (``x >= 0`` where the input is a ReLU output, the pixel ``box`` for
  the stem). Each image has its own multipliers, penalty, step sizes and convergence flag; images never interact.

  Args:
    block: a folded block from :func:`peel_jax.blocks.extract`.
    y: the observed output, ``(N, Ho, Wo, Co)`` or one image ``(Ho, Wo, Co)``; float32 (float64 under x64).
    x0: optional start of the same (batched or not) layout as the input; default: ``config.init``.
    key: PRNG key, used only by random initialisations.
    config: a :class:`SolverConfig`; default ``SolverConfig()``.
    box: ``(lo, hi)`` bounds on the input (the stem's normalised pixel range), or ``None``.

  Returns:
    ``(x_hat, info)``: ``x_hat`` of shape ``block.input_shape(y.shape)``; ``info`` an :class:`InversionInfo` with
    per-image ``residual``, ``max_violation``, ``comp_gap``, ``iterations``, ``converged``, ``diverged``.

  Raises:
    ValueError / TypeError: bad input (see :func:`validate_observation`), before any compilation.
  """
  config = SolverConfig() if config is None else config
  config.validate()
  y, x0, batched = validate_observation(block, y, x0=x0, box=box)
  key = jax.random.key(0) if key is None else key
  x_hat, inf = solve_batch(block, y, x0, key, config, box)
  if not batched:
    x_hat = x_hat[0]
    inf = jax.tree.map(lambda a: a[0], inf)
  return x_hat, inf
