"""The invertible-ResNet fixed-point iteration, as a baseline block inverter.

For an identity-shortcut block without post-add activation, ``y = x + F(x)``, the input is a fixed point of

    x <- y - F(x)

(Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen, "Invertible Residual Networks", ICML 2019, Alg. 1), started at
``x = y``. If ``F`` is a contraction (``Lip(F) < 1``) the iteration converges linearly, at rate ``Lip(F)``, to the
unique preimage (Banach); otherwise it may stall, oscillate or diverge. ``F`` is ``block.branch`` for the basic,
paper and bottleneck blocks, and ``block.branch(block.pre(x))`` for the pre-activation block (whose identity shortcut
adds ``x`` itself). No constraint (such as ``x >= 0``) is imposed: this is the plain iteration of the paper.

The residual of the current iterate costs nothing: ``block(x_k) - y = x_k + F(x_k) - y = x_k - x_{k+1}``.

Driver: on CPU a convolution inside an XLA loop body (``fori_loop``/``while_loop``/``scan``) measured about 3x
slower than the same step unrolled, so the iteration is driven from Python in jitted, unrolled chunks of
``steps_per_call`` iterations; every image carries its own iteration count and stop flag, and a stopped image is
frozen by masks, so batching changes no image's result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from peel_jax.blocks import Block
from peel_jax.problems.block import fixed_point_obstacle, residual_branch
from peel_jax.solver import info as _info

# An image whose residual exceeds this multiple of the best residual it has reached is stopped as diverged.
DIVERGENCE_FACTOR = 1e4


def check_applicable(block: Block) -> None:
  """Raises ``ValueError`` unless ``block`` is ``y = x + F(x)`` (identity shortcut, no post-add activation)."""
  if not isinstance(block, Block):
    raise TypeError(f"expected a peel_jax.blocks.Block, got {type(block).__name__}")
  why = fixed_point_obstacle(block)
  if why is not None:
    raise ValueError(
        f"fixed_point applies only to identity-shortcut blocks without post-add activation (y = x + F(x)); "
        f"block {block.spec.name or block.spec.kind!r} does not qualify: {why}. Use peel_jax.invert_block instead."
    )


def _per_image(mask, a):
  return mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))


def _norm(a):
  return jnp.sqrt(jnp.sum(a * a, axis=tuple(range(1, a.ndim))))


@functools.partial(jax.jit, static_argnames=("steps",))
def _chunk(block, y, scale, state, iters, tol, steps: int):
  """``steps`` fixed-point iterations (unrolled) for every image still running."""
  x, best_x, best_res, k, done, diverged = state
  for _ in range(steps):
    x_new = y - residual_branch(block, x)
    res = _norm(x - x_new) / scale  # relative residual of x (before the update)
    finite = jnp.isfinite(res) & jnp.all(jnp.isfinite(x_new).reshape(x.shape[0], -1), axis=1)
    better = jnp.isfinite(res) & (res < best_res)
    best_x = jnp.where(_per_image(better & ~done, x), x, best_x)
    best_res = jnp.where(better & ~done, res, best_res)
    hit = jnp.isfinite(res) & (res <= tol)
    blown = ~finite | (res > DIVERGENCE_FACTOR * best_res)
    at_budget = k >= iters  # the last iterate's residual is still evaluated (above) before the image stops
    step = ~done & ~hit & ~blown & ~at_budget
    x = jnp.where(_per_image(step, x), x_new, x)
    k = k + step.astype(k.dtype)
    diverged = diverged | (~done & ~hit & blown)
    done = done | hit | blown | at_budget
  return x, best_x, best_res, k, done, diverged


@jax.jit
def _finalize(block, y, best_x, k, diverged, tol):
  res = _info.relative_residual(block, best_x, y)
  viol = jax.vmap(lambda xx: _info.x_bound_violation(block, xx))(best_x)
  finite = jnp.all(jnp.isfinite(best_x).reshape(best_x.shape[0], -1), axis=1) & jnp.isfinite(res)
  return _info.InversionInfo(
      residual=res,
      max_violation=viol,
      comp_gap=jnp.zeros_like(res),
      iterations=k,
      converged=finite & (res <= tol * 1.0001),
      diverged=diverged | ~finite,
  )


def fixed_point(
    block: Block,
    y: jax.Array,
    *,
    iters: int = 200,
    tol: float = 1e-6,
    x0: jax.Array | None = None,
    steps_per_call: int = 10,
) -> tuple[jax.Array, _info.InversionInfo]:
  """Inverts an identity-shortcut block by the fixed-point iteration ``x <- y - F(x)``, per image, batched.

  Args:
    block: a folded block ``y = x + F(x)``: identity shortcut, no post-add activation (the paper block, a basic or
      bottleneck block built without post-add ReLU, or a pre-activation block).
    y: the observed output, ``(N, H, W, C)`` or one image ``(H, W, C)``.
    iters: iteration budget per image.
    tol: an image stops when its relative residual ``||block(x) - y|| / ||y||`` is at most ``tol``.
    x0: start, same layout as ``y``; default ``y`` (Behrmann et al.).
    steps_per_call: iterations per jitted call (unrolled; the Python driver checks for completion between calls).

  Returns:
    ``(x_hat, info)``: ``x_hat`` the iterate with the smallest residual seen, per image; an
    :class:`peel_jax.InversionInfo` (``max_violation``: violation of ``x >= 0`` where the block's input is known to be
    a ReLU output, which the iteration does not impose; ``comp_gap``: 0, nothing is lifted; ``iterations``: updates
    made; ``diverged``: a non-finite iterate, or a residual ``DIVERGENCE_FACTOR`` times the best one reached).

  Raises:
    ValueError: the block is not of the form ``y = x + F(x)`` (conv shortcut, post-add activation, the stem), or
      ``y`` / ``x0`` have the wrong shape.
  """
  check_applicable(block)
  if iters < 0 or steps_per_call < 1:
    raise ValueError(f"need iters >= 0 and steps_per_call >= 1, got {iters} and {steps_per_call}")
  if not tol > 0:
    raise ValueError(f"tol must be > 0, got {tol}")
  y = jnp.asarray(y)
  if y.ndim not in (3, 4) or y.shape[-1] != block.spec.in_channels:
    raise ValueError(
        f"y must be (N, H, W, {block.spec.in_channels}) or (H, W, {block.spec.in_channels}) for block "
        f"{block.spec.name or block.spec.kind!r}, got shape {tuple(y.shape)}"
    )
  batched = y.ndim == 4
  if not batched:
    y = y[None]
  if x0 is None:
    x = y
  else:
    x = jnp.asarray(x0, y.dtype)
    if not batched:
      x = x[None]
    if x.shape != y.shape:
      raise ValueError(f"x0 has shape {tuple(x.shape)}; expected {tuple(y.shape)}")
  n = y.shape[0]
  scale = jnp.maximum(_norm(y), 1e-30)
  state = (x, x, jnp.full((n,), jnp.inf, y.dtype), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), bool),
           jnp.zeros((n,), bool))
  iters_a, tol_a = jnp.asarray(iters, jnp.int32), jnp.asarray(tol, y.dtype)
  while not bool(jax.device_get(jnp.all(state[4]))):
    state = _chunk(block, y, scale, state, iters_a, tol_a, steps=steps_per_call)
  _, best_x, _, k, _, diverged = state
  inf = _finalize(block, y, best_x, k, diverged, tol_a)
  if not batched:
    best_x = best_x[0]
    inf = jax.tree.map(lambda a: a[0], inf)
  return best_x, inf
