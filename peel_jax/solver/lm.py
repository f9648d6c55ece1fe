"""Levenberg-Marquardt steps for bound-constrained nonlinear least squares, matrix-free.

Minimises ``phi(u) = 0.5 * ||R(u)||^2`` over ``lower <= u <= upper`` (pytrees). One step:

1. ``R(u)`` and its linearisation ``J`` by ``jax.linearize``; ``J^T`` by ``jax.linear_transpose``.
2. The free set: a variable at a bound whose gradient ``J^T R`` pushes outward is held fixed.
3. ``d = argmin ||J_free d + R||^2 + damping * ||d||^2`` by CGLS (Hestenes-Stiefel on the normal equations,
   numerically the stable form), ``cg_iters`` iterations, unrolled (loops around convolutions are slow on CPU).
4. Trials ``u' = clip(u + t d)`` for ``t`` in :data:`STEP_LADDER` (unrolled backtracking): the longest step that
   decreases ``phi`` is taken; the damping shrinks when the full step succeeds and grows when none does
   (Marquardt's rule; Nocedal & Wright, *Numerical Optimization*, Sec. 10.3). The damping is relative to the
   curvature of ``J^T J`` along the gradient, so the rule is scale-free.

Given the activation pattern a block is affine, so the Gauss-Newton model is exact on each linear piece and the
method ends in a few steps once the pattern is right (semi-smooth Newton).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp

tree = jax.tree_util

STEP_LADDER = (1.0, 0.5, 0.25, 0.125, 0.0625)


def tdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(tree.tree_leaves(a), tree.tree_leaves(b)))


def taxpy(alpha, x, y):
  """``alpha * x + y`` on pytrees."""
  return tree.tree_map(lambda u, v: alpha * u + v, x, y)


def tscale(alpha, x):
  return tree.tree_map(lambda u: alpha * u, x)


def cgls(jv: Callable, jtv: Callable, r, damping, iters: int, like):
  """Approximately solves ``min_d ||J d + r||^2 + damping ||d||^2`` from ``d = 0`` (unrolled CGLS)."""
  d = tree.tree_map(jnp.zeros_like, like)
  s = tscale(-1.0, r)
  g = jtv(s)
  p, gg = g, tdot(g, g)
  for _ in range(iters):
    q = jv(p)
    alpha = gg / jnp.maximum(tdot(q, q) + damping * tdot(p, p), 1e-30)
    d = taxpy(alpha, p, d)
    s = taxpy(-alpha, q, s)
    g = taxpy(-damping, d, jtv(s))
    gg_new = tdot(g, g)
    p = taxpy(gg_new / jnp.maximum(gg, 1e-30), p, g)
    gg = gg_new
  return d


def gmres(jv: Callable, b: jax.Array, iters: int) -> jax.Array:
  """Approximately solves the square system ``J d = b`` (flat vectors) from ``d = 0``: ``iters`` unrolled GMRES steps.

  Arnoldi with classical Gram-Schmidt applied twice (CGS2, as accurate as modified Gram-Schmidt and one matrix
  product per pass), then the ``(iters + 1) x iters`` Hessenberg least-squares problem (Saad & Schultz, SIAM J. Sci.
  Stat. Comput. 7, 1986). No restart: ``iters`` products with ``J``.
  """
  beta = jnp.linalg.norm(b)
  basis = jnp.zeros((iters + 1, b.size), b.dtype).at[0].set(b / jnp.maximum(beta, 1e-30))
  hess = jnp.zeros((iters + 1, iters), b.dtype)
  for j in range(iters):
    w = jv(basis[j])
    h = basis @ w
    w = w - basis.T @ h
    h2 = basis @ w
    w = w - basis.T @ h2
    norm = jnp.linalg.norm(w)
    hess = hess.at[:, j].set((h + h2).at[j + 1].set(norm))
    basis = basis.at[j + 1].set(w / jnp.maximum(norm, 1e-30))
  rhs = jnp.zeros((iters + 1,), b.dtype).at[0].set(beta)
  coef = jnp.linalg.lstsq(hess, rhs)[0]
  return basis[:iters].T @ coef


def backtrack(residual: Callable, u, d, lower, upper, cost0):
  """The longest step ``clip(u + t d)``, ``t`` in :data:`STEP_LADDER`, that lowers ``0.5 ||R||^2`` below ``cost0``.

  Unrolled (a loop would be slow on CPU). Returns ``(u', cost', full_step_taken, any_step_taken)``; ``u' = u`` when
  no step lowers the cost.
  """
  best_u, best_cost, taken, first = u, cost0, jnp.zeros((), bool), jnp.zeros((), bool)
  for i, t in enumerate(STEP_LADDER):
    trial = tree.tree_map(lambda x, dd, lo, hi: jnp.clip(x + t * dd, lo, hi), u, d, lower, upper)
    rt = residual(trial)
    cost = 0.5 * tdot(rt, rt)
    ok = ~taken & jnp.isfinite(cost) & (cost < cost0)
    best_u = tree.tree_map(lambda a, b: jnp.where(ok, a, b), trial, best_u)
    best_cost = jnp.where(ok, cost, best_cost)
    first = ok if i == 0 else first
    taken = taken | ok
  return best_u, best_cost, first, taken


class LMState(NamedTuple):
  damping: jax.Array
  cost: jax.Array  # 0.5 ||R(u)||^2 at the current u (inf = not yet evaluated)


def init(damping: float, dtype=jnp.float32) -> LMState:
  return LMState(jnp.asarray(damping, dtype), jnp.asarray(jnp.inf, dtype))


def step(residual: Callable, u, lower, upper, state: LMState, cg_iters: int):
  """One projected LM step; returns ``(u, state)``. Pure, single problem (``vmap`` for a batch)."""
  r, jv0 = jax.linearize(residual, u)
  jt = jax.linear_transpose(jv0, u)
  cost0 = 0.5 * tdot(r, r)
  grad = jt(r)[0]
  eps = 1e-12
  free = tree.tree_map(
      lambda x, g, lo, hi: ~(((x <= lo + eps) & (g > 0)) | ((x >= hi - eps) & (g < 0))), u, grad, lower, upper
  )
  mask = lambda t: tree.tree_map(lambda a, f: jnp.where(f, a, 0.0), t, free)
  jv = lambda t: jv0(mask(t))
  jtv = lambda w: mask(jt(w)[0])
  # Damping relative to the curvature along the gradient (Rayleigh quotient of J^T J): scale-free.
  gf = mask(grad)
  jg = jv(gf)
  curvature = tdot(jg, jg) / jnp.maximum(tdot(gf, gf), 1e-30)
  d = cgls(jv, jtv, r, state.damping * curvature, cg_iters, u)
  best_u, best_cost, first, taken = backtrack(residual, u, mask(d), lower, upper, cost0)
  damping = jnp.where(first, state.damping * 0.3, jnp.where(taken, state.damping, state.damping * 10.0))
  damping = jnp.clip(damping, 1e-9, 1e8)
  return best_u, LMState(damping, best_cost)


def newton_gmres_step(residual: Callable, u, lower, upper, state: LMState, iters: int):
  """One projected semi-smooth Newton step on a square residual (``R(u)`` the size of ``u``): ``d`` from
  :func:`gmres` on ``J d = -R``, then the longest step of :data:`STEP_LADDER` that lowers ``||R(clip(u + t d))||``.
  Returns ``(u, state)``; pure, one problem."""
  flat, unravel = jax.flatten_util.ravel_pytree(u)
  res_flat = lambda v: jax.flatten_util.ravel_pytree(residual(unravel(v)))[0]
  r, jv = jax.linearize(res_flat, flat)
  d = unravel(gmres(jv, -r, iters))
  best_u, best_cost, _, _ = backtrack(residual, u, d, lower, upper, 0.5 * jnp.vdot(r, r))
  return best_u, LMState(state.damping, best_cost)
