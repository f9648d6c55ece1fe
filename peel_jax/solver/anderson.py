"""Anderson-accelerated projected fixed-point iteration, an update rule of the engine.

For a problem with a fixed-point map ``G`` (:class:`peel_jax.solver.engine.Problem`, ``fixed_point``), e.g. an
identity-shortcut block ``y = x + F(x)`` with ``G(x) = y - F(x)``, one step from ``x_k`` is (Walker & Ni, "Anderson
acceleration for fixed-point iterations", SIAM J. Numer. Anal. 49, 2011, the difference form of type II):

    g_k = G(x_k),   f_k = g_k - x_k,
    gamma = argmin_gamma ||f_k - dF gamma||^2 + reg ||gamma||^2,      dF, dG: the last m differences of f and g,
    x_{k+1} = P(g_k - dG gamma),

with ``P`` the projection onto the problem's bounds and ``reg`` a relative Tikhonov term (``REG`` times the mean
squared norm of the stored differences) that keeps the small ``m x m`` system solvable. Memory ``m = 0`` is the plain
projected iteration ``x_{k+1} = P(G(x_k))`` (Behrmann et al., "Invertible Residual Networks", ICML 2019).

The merit of ``x_k`` comes with ``G(x_k)`` from the same evaluation (:attr:`Method.score`), so a step costs one
forward. A step gives up (the engine then ends the image unconverged) when the best merit has not halved in the last
:data:`WINDOW` steps, or the merit exceeds :data:`DIVERGENCE_FACTOR` times the best: a map that does not contract
near the iterate costs about ``WINDOW`` forwards before the caller falls back to another method. Within
:data:`FLOOR_BAND` times ``config.tol``, a step that lowers the merit by less than the factor :data:`FLOOR_PROGRESS`
ends the image too: the iteration has reached the rounding floor of the arithmetic (a caller may ask for a ``tol``
below its own to get the most accurate iterate the iteration can give).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from peel_jax.solver import engine

WINDOW = 3
DIVERGENCE_FACTOR = 1e4
REG = 1e-6
FLOOR_BAND = 100.0
FLOOR_PROGRESS = 0.9


class AndersonState(NamedTuple):
  """One image's state; ``dF``, ``dG`` ``(m, n)`` hold the last ``m`` differences (a ring, ``count`` of them)."""

  dF: jax.Array
  dG: jax.Array
  f_prev: jax.Array
  g_prev: jax.Array
  count: jax.Array  # differences stored (at most m are kept)
  scored: Any  # x_k, the last step's input
  merit: jax.Array  # merit of x_k
  best: jax.Array  # best merit so far
  mark: jax.Array  # merit at the last halving
  since: jax.Array  # steps since the last halving
  stop: jax.Array


def _init(problem, config, u, data, shared, lam, mu, rho):
  flat, _ = ravel_pytree(u)
  m, n = config.anderson_memory, flat.size
  inf = jnp.asarray(jnp.inf, flat.dtype)
  return AndersonState(dF=jnp.zeros((m, n), flat.dtype), dG=jnp.zeros((m, n), flat.dtype),
                       f_prev=jnp.zeros_like(flat), g_prev=jnp.zeros_like(flat), count=jnp.zeros((), jnp.int32),
                       scored=u, merit=inf, best=inf, mark=inf, since=jnp.zeros((), jnp.int32),
                       stop=jnp.zeros((), bool))


def _mix(dF, dG, valid, f, g):
  """``g - dG gamma`` with ``gamma`` the regularised least-squares coefficients on the valid rows."""
  dF = jnp.where(valid[:, None], dF, 0.0)
  gram = dF @ dF.T
  reg = REG * jnp.maximum(jnp.trace(gram) / jnp.maximum(jnp.sum(valid), 1), 1e-30)
  gram = gram + jnp.diag(jnp.where(valid, reg, 1.0))
  gamma = jnp.where(valid, jnp.linalg.solve(gram, dF @ f), 0.0)
  return g - gamma @ jnp.where(valid[:, None], dG, 0.0)


def _step(problem, config, u, inner: AndersonState, data, shared, lam, mu, rho, k):
  g_tree, merit = problem.fixed_point(u, data, shared)
  x, unravel = ravel_pytree(u)
  g, _ = ravel_pytree(g_tree)
  f = g - x
  m = config.anderson_memory
  if m > 0:
    slot = inner.count % m
    have = jnp.isfinite(inner.merit)  # a previous step stored f_prev, g_prev
    dF = inner.dF.at[slot].set(jnp.where(have, f - inner.f_prev, inner.dF[slot]))
    dG = inner.dG.at[slot].set(jnp.where(have, g - inner.g_prev, inner.dG[slot]))
    count = inner.count + have.astype(jnp.int32)
    x_new = _mix(dF, dG, jnp.arange(m) < count, f, g)
  else:
    dF, dG, count, x_new = inner.dF, inner.dG, inner.count, g
  lower, upper = problem.bounds(u, data, shared)
  u_new = jax.tree_util.tree_map(jnp.clip, unravel(x_new), lower, upper)
  best = jnp.minimum(inner.best, merit)
  halved = merit <= 0.5 * inner.mark
  since = jnp.where(halved, 0, inner.since + 1)
  floor = (merit > FLOOR_PROGRESS * inner.merit) & (merit <= FLOOR_BAND * config.tol)
  stop = (since > WINDOW) | (merit > DIVERGENCE_FACTOR * best) | floor
  state = AndersonState(dF=dF, dG=dG, f_prev=f, g_prev=g, count=count, scored=u, merit=merit, best=best,
                        mark=jnp.where(halved, merit, inner.mark), since=since, stop=stop)
  return u_new, state


def _score(inner: AndersonState):
  return inner.scored, inner.merit, inner.stop


ANDERSON = engine.Method(_init, _step, restart=False, score=_score)
