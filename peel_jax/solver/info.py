"""Per-image diagnostics of a block inversion, shared by every solver and baseline."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peel_jax.blocks import Block
from peel_jax.solver import lifted


class InversionInfo(NamedTuple):
  """What a block inverter reports, one entry per image (leading axis = batch).

  Attributes:
    residual: ``||block(x_hat) - y|| / ||y||``, the true forward's relative residual (float).
    max_violation: largest violation of the constraints at the final iterate, relative to the rms of ``y``:
      ``|A(.) - (p - n)|`` and negative ``p``/``n`` (lifted), ``z > 0`` where a post-add ReLU output is 0, and the
      architecture's bounds on ``x`` (``x >= 0`` where known; the pixel box for the stem).
    comp_gap: largest complementarity product ``p * n`` at the final iterate, relative to ``rms(y)^2`` (0 for the
      reduced formulation, where ``p = relu(u)``, ``n = relu(-u)`` exactly).
    iterations: iterations spent (solver-specific unit: outer x inner, or steps).
    converged: ``residual <= tol`` and finite.
    diverged: a non-finite value appeared; ``x_hat`` then holds the last finite iterate (or the start).
    path: which method gave ``x_hat`` (:func:`peel_jax.invert_block` only; ``None`` for the baselines):
      :data:`PATH_AL` (the augmented Lagrangian) or :data:`PATH_FIXED_POINT` (the fixed-point fast path, see
      :class:`peel_jax.SolverConfig` ``fast_path``).
  """

  residual: jax.Array
  max_violation: jax.Array
  comp_gap: jax.Array
  iterations: jax.Array
  converged: jax.Array
  diverged: jax.Array
  path: jax.Array | None = None


PATH_AL = 0
PATH_FIXED_POINT = 1


def relative_residual(block: Block, x: jax.Array, y: jax.Array) -> jax.Array:
  """``||block(x) - y|| / ||y||`` per image; ``x``, ``y`` batched NHWC."""
  r = block(x) - y
  axes = tuple(range(1, y.ndim))
  return jnp.sqrt(jnp.sum(r * r, axes)) / jnp.maximum(jnp.sqrt(jnp.sum(y * y, axes)), 1e-30)


def relative_error(x_hat: jax.Array, x: jax.Array) -> jax.Array:
  """``||x_hat - x|| / ||x||`` per image (batched)."""
  axes = tuple(range(1, x.ndim))
  d = x_hat - x
  return jnp.sqrt(jnp.sum(d * d, axes)) / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axes)), 1e-30)


def x_bound_violation(block: Block, x: jax.Array, box=None) -> jax.Array:
  """Largest violation of what the architecture guarantees about ``x`` (one image)."""
  v = jnp.zeros((), x.dtype)
  if block.spec.input_nonneg:
    v = jnp.maximum(v, jnp.max(-x))
  if box is not None:
    lo, hi = (jnp.broadcast_to(jnp.asarray(b, x.dtype), x.shape) for b in box)
    v = jnp.maximum(v, jnp.max(jnp.maximum(lo - x, x - hi)))
  return v


def lifted_violation(block: Block, v: dict, box=None) -> tuple[jax.Array, jax.Array]:
  """(max constraint violation, max complementarity product) of lifted variables ``v`` (one image)."""
  ev = lifted.evaluate(block, v)
  viol = x_bound_violation(block, v["x"], box)
  for e in ev.eq:
    viol = jnp.maximum(viol, jnp.max(jnp.abs(e)))
  for p, n in zip(v["p"], v["n"]):
    viol = jnp.maximum(viol, jnp.maximum(jnp.max(-p), jnp.max(-n)))
  gap = jnp.zeros((), v["x"].dtype)
  for c in ev.comp:
    gap = jnp.maximum(gap, jnp.max(c))
  return viol, gap
