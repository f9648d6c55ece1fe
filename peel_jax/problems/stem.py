"""The stem ``y = pool(act(A0 x))`` inverted without argmax indices (the attacker does not have them).

``pool`` is max 3x3/2 pad 1, avg 3x3/2 pad 1, or none. Without pooling the stem is one :func:`peel_jax.invert_block`
with the pixel box as bounds. With pooling, with ``r = act(A0 x)`` the pre-pool map, the explicit formulation is:

* max pool: every ``r_p`` is at most every pooled output whose window covers ``p``,
  ``r_p <= U_p = min_{w ∋ p} y_w``, and each window attains its value, ``max_{p in w} r_p = y_w`` (fitted by least
  squares);
* avg pool: the linear equation ``avgpool(r) = y``, and (ReLU: ``r >= 0``) ``r_p <= 9 min_{w ∋ p} y_w``;
* the pixel box ``lo <= x <= hi``.

``method='bounded'`` solves it in two stages: (1) the largest admissible pre-pool map (``r0 = U`` for max, the
window values spread back for avg) is inverted through the conv + ReLU alone for a start; (2) from there, the
engine (:mod:`peel_jax.solver.engine`, LM inner) on the problem of :data:`POOLED`: residual
``(pool(r) - y) / ||y||``, inequality ``(r - U) / ||y|| <= 0``, the box by projection. Measurements of the three
methods: ``benchmarks/RESULTS.md`` (section "Narratives moved from docstrings").
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peel_jax import images as _images
from peel_jax._invert_block import invert_block
from peel_jax.blocks import Block, pool
from peel_jax.solver import engine
from peel_jax.solver.config import SolverConfig

METHODS = ("bounded", "two_stage", "direct")


def pool_upper_bound(y: jax.Array, size: tuple[int, int], kind: str) -> jax.Array:
  """Per pre-pool position, the bound from every pooled output whose window covers it (one image).

  For the 3x3 stride-2 pad-1 pool, input row ``i`` is covered by output rows ``i // 2`` and ``(i + 1) // 2``.
  Max pool: ``U_p = min_{w ∋ p} y_w``. Avg pool (non-negative ``r``): ``U_p = 9 min_{w ∋ p} y_w``.

  Args:
    y: pooled output ``(Ho, Wo, C)``.
    size: ``(H, W)`` of the pre-pool map.
    kind: ``'max'`` or ``'avg'``.

  Returns:
    ``(H, W, C)`` bounds.
  """
  ho, wo = y.shape[0], y.shape[1]
  i, j = np.arange(size[0]), np.arange(size[1])
  ia, ib = np.minimum(i // 2, ho - 1), np.minimum((i + 1) // 2, ho - 1)
  ja, jb = np.minimum(j // 2, wo - 1), np.minimum((j + 1) // 2, wo - 1)
  g = lambda a, b: y[a][:, b]
  u = jnp.minimum(jnp.minimum(g(ia, ja), g(ia, jb)), jnp.minimum(g(ib, ja), g(ib, jb)))
  return u if kind == "max" else 9.0 * u


def spread_back(y: jax.Array, size) -> jax.Array:
  """Each pre-pool position takes the value of the window centred nearest it (one image)."""
  i = np.minimum(np.arange(size[0]) // 2, y.shape[0] - 1)
  j = np.minimum(np.arange(size[1]) // 2, y.shape[1] - 1)
  return y[i][:, j]


def unpooled(stem: Block) -> Block:
  """The stem without its pooling (its output is the pre-pool map ``act(A0 x)``)."""
  return Block(stem.params, dataclasses.replace(stem.spec, pool="none", stride=stem.spec.strides[0]))


class StemData(NamedTuple):
  y: jax.Array  # pooled output (Ho, Wo, C)
  ub: jax.Array  # pre-pool upper bound (H, W, C), inf where none
  scale: jax.Array  # ||y||


class StemShared(NamedTuple):
  stem: Block
  lo: jax.Array  # pixel box of one image (H, W, 3)
  hi: jax.Array


def _pre(x, sh: StemShared):
  return sh.stem.act("relu")(sh.stem.affine(0, x[None]))[0]


def _residual(x, d: StemData, sh: StemShared):
  return (pool(_pre(x, sh)[None], sh.stem.spec.pool)[0] - d.y) / d.scale


def _inequality(x, d: StemData, sh: StemShared):
  return {"ub": jnp.where(jnp.isfinite(d.ub), (_pre(x, sh) - d.ub) / d.scale, 0.0)}


def _bounds(x, d, sh: StemShared):
  return sh.lo, sh.hi


def _merit(x, d: StemData, sh: StemShared):
  r = _residual(x, d, sh)
  return jnp.sqrt(jnp.sum(r * r))


POOLED = engine.Problem(residual=_residual, bounds=_bounds, merit=_merit, inequality=_inequality)


def _pooled_data(stem: Block, y):
  size = (2 * y.shape[1], 2 * y.shape[2])
  kind = stem.spec.pool
  if kind == "max" or stem.spec.activation == "relu":
    ub = jax.vmap(lambda yy: pool_upper_bound(yy, size, kind))(y)
  else:  # avg pool of a signed activation: no bound
    ub = jnp.full((y.shape[0], *size, y.shape[-1]), jnp.inf, y.dtype)
  scale = jnp.maximum(jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3))), 1e-30)
  return StemData(y, ub, scale)


def solve_pooled(stem: Block, y, x0, box, config: SolverConfig):
  """Stage (2) of the pooled-stem inversion from ``x0`` ``(N, H, W, 3)``; returns ``(best x, iterations)``."""
  lo, hi = engine.box_bounds(box, x0.shape[1:], y.dtype)
  x = jnp.clip(x0, lo[None], hi[None])
  st = engine.solve(POOLED, config, x, _pooled_data(stem, y), StemShared(stem, lo, hi), method=engine.LM)
  return st.best_u, st.k


def invert_stem(stem: Block, y, *, key=None, config: SolverConfig | None = None, box=None,
                method: str = "bounded"):
  """Recovers images from the stem output ``y`` ``(N, Ho, Wo, C)`` (see the module docstring).

  Args:
    stem: the stem block (:func:`peel_jax.blocks.extract` ``(model, variables, 'stem')``).
    y: the stem's output (after its pooling, if any), float32.
    key: PRNG key of the start's noise (mid-grey plus ``0.05 N(0, I)``: at ``x = 0`` a bias-free stem has a zero
      Jacobian).
    config: solver options (``max_iters``, ``cg_iters``, ``tol``, penalty settings, ``driver``).
    box: ``(lo, hi)`` arrays of one image's input shape, or ``None``.
    method: for a pooled stem, ``'bounded'``, ``'two_stage'`` or ``'direct'``.

  Returns:
    ``(x_hat, iterations)``: normalised images ``(N, H, W, 3)`` and iterations spent per image ``(N,)`` int32.

  Raises:
    ValueError: an unknown ``method``.
  """
  if method not in METHODS:
    raise ValueError(f"unknown stem method {method!r}; expected one of {METHODS}")
  config = SolverConfig() if config is None else config
  key = jax.random.key(0) if key is None else key
  k_noise, k_solve = jax.random.split(key)
  in_shape = stem.input_shape(y.shape)
  gray = jnp.broadcast_to(jnp.asarray(_images.normalize(np.full(3, 0.5, np.float32))), in_shape)
  x0 = gray + 0.05 * jax.random.normal(k_noise, in_shape, y.dtype)
  if box is not None:
    x0 = jnp.clip(x0, box[0][None], box[1][None])
  if stem.spec.pool == "none" or method == "direct":
    x, info = invert_block(stem, y, x0=x0, key=k_solve, config=config, box=box)
    return x, info.iterations
  size = (2 * y.shape[1], 2 * y.shape[2])
  if stem.spec.pool == "max":
    r0 = jax.vmap(lambda yy: pool_upper_bound(yy, size, "max"))(y)
  else:
    r0 = jax.vmap(lambda yy: spread_back(yy, size))(y)
  x1, info = invert_block(unpooled(stem), r0, x0=x0, key=k_solve, config=config, box=box)
  if method == "two_stage":
    return x1, info.iterations
  x2, k = solve_pooled(stem, y, x1, box, config)
  return x2, info.iterations + k
