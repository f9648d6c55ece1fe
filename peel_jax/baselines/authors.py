"""The PEEL authors' at-scale block solver, reimplemented in JAX as the baseline.

As described in arXiv 2504.06410 (Sec. 5) for real ResNets: the lifted problem of
:mod:`peel_jax.solver.lifted` with every constraint moved into a fixed quadratic penalty,

    min_{x,p,n}  || out(x, p, n) - y ||^2 + mu * sum_k ( || A_k(.) - (p_k - n_k) ||^2 + || p_k * n_k ||^2 ),

``mu = 1e2``, Adam with learning rate 0.01 for 1000 steps, ``p`` and ``n`` clamped at zero after every step, every
variable initialised at ``1e-3 * N(0, I)``, one image at a time (here ``vmap``-ed: each image has its own Adam state,
so batching changes no image's result).

The steps run on the solver engine (:mod:`peel_jax.solver.engine`: its per-image state, masks, budget and drivers)
with this update rule (:data:`ADAM_PENALTY`). Two drivers run the identical steps: ``'python'`` (default) calls a
jitted chunk of ``chunk`` unrolled steps from Python, as the authors' PyTorch loop did; ``'fori_loop'`` runs all
steps in the engine's ``lax.while_loop``. On this CPU a convolution inside an XLA loop body measured about 3x slower
(``benchmarks.loop_overhead``), so timing the loop driver would flatter our solver.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from peel_jax.blocks import Block
from peel_jax.solver import info as _info
from peel_jax.solver import engine, lifted
from peel_jax.solver.config import SolverConfig


def _loss(block, v, y, penalty):
  ev = lifted.evaluate(block, v)
  fit = jnp.sum((ev.out - y) ** 2)
  pen = sum(jnp.sum(e * e) for e in ev.eq) + sum(jnp.sum(c * c) for c in ev.comp)
  return fit + penalty * pen


def _init_one(block, y, key, init_scale):
  template = lifted.zeros_like_lifted(block, block.input_shape((1, *y.shape))[1:], y.dtype)
  leaves, tree = jax.tree.flatten(template)
  keys = jax.random.split(key, len(leaves))
  return tree.unflatten([init_scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def start(block: Block, y, keys, init_scale: float):
  """Every image's lifted start ``{'x', 'p', 'n'}``, each ``init_scale * N(0, I)`` (image ``i`` from ``keys[i]``)."""
  return jax.vmap(lambda yy, kk: _init_one(block, yy, kk, init_scale))(y, keys)


class _Data(NamedTuple):
  y: jax.Array  # one image's observation


class _Shared(NamedTuple):
  block: Block
  penalty: jax.Array


def _residual(v, d: _Data, sh: _Shared):
  """The penalty objective as a least-squares vector: ``||R||^2`` is :func:`_loss`."""
  ev = lifted.evaluate(sh.block, v)
  sp = jnp.sqrt(sh.penalty)
  return {"fit": ev.out - d.y, "eq": tuple(sp * e for e in ev.eq), "comp": tuple(sp * c for c in ev.comp)}


def _bounds(v, d, sh):
  lower = {"x": jnp.full_like(v["x"], -jnp.inf), "p": tuple(jnp.zeros_like(a) for a in v["p"]),
           "n": tuple(jnp.zeros_like(a) for a in v["n"])}
  upper = jax.tree.map(lambda a: jnp.full_like(a, jnp.inf), v)
  return lower, upper


# No merit: the authors run a fixed number of steps and keep the last iterate.
PROBLEM = engine.Problem(residual=_residual, bounds=_bounds, merit=None)


def _init(problem, config, v, data, shared, lam, mu, rho):
  return optax.adam(config.learning_rate).init(v)


def _step(problem, config, v, state, d: _Data, sh: _Shared, lam, mu, rho, k):
  """One Adam step on :func:`_loss`, then ``p`` and ``n`` clamped at zero (the projection on the bounds)."""
  g = jax.grad(_loss, argnums=1)(sh.block, v, d.y, sh.penalty)
  upd, state = optax.adam(config.learning_rate).update(g, state, v)
  v = optax.apply_updates(v, upd)
  v = {"x": v["x"], "p": tuple(jax.nn.relu(p) for p in v["p"]), "n": tuple(jax.nn.relu(n) for n in v["n"])}
  return v, state


ADAM_PENALTY = engine.Method(_init, _step)


@jax.jit
def _diagnostics(block, y, v, steps, tol):
  x_hat = v["x"]
  res = _info.relative_residual(block, x_hat, y)
  viol, gap = jax.vmap(lambda vv: _info.lifted_violation(block, vv))(v)
  finite = jnp.all(jnp.isfinite(x_hat.reshape(x_hat.shape[0], -1)), axis=1)
  unit = jnp.sqrt(jnp.mean(y.reshape(y.shape[0], -1) ** 2, axis=1))
  return _info.InversionInfo(
      residual=res,
      max_violation=viol / unit,
      comp_gap=gap / unit**2,
      iterations=jnp.full(y.shape[:1], steps, jnp.int32),
      converged=finite & (res <= tol),
      diverged=~finite,
  )


def authors_penalty(
    block: Block,
    y: jax.Array,
    *,
    key: jax.Array,
    steps: int = 1000,
    lr: float = 0.01,
    penalty: float = 1e2,
    init_scale: float = 1e-3,
    tol: float = 1e-4,
    driver: str = "python",
    chunk: int = 10,
) -> tuple[jax.Array, _info.InversionInfo]:
  """Inverts ``block`` at a batch ``y`` ``(N, Ho, Wo, Co)`` with the authors' penalty + Adam method.

  Returns:
    ``(x_hat, info)``: ``x_hat`` of shape ``block.input_shape(y.shape)``; :class:`InversionInfo` per image, with
    the same scale-free conventions as :func:`peel_jax.invert_block` (``converged`` means the relative residual
    reached ``tol``, which this method rarely does).
  """
  if y.ndim != 4:
    raise ValueError(f"y must be a batch (N, H, W, C), got shape {y.shape}")
  if driver not in ("python", "fori_loop"):
    raise ValueError(f"unknown driver {driver!r}; expected 'python' or 'fori_loop'")
  v = start(block, y, jax.random.split(key, y.shape[0]), init_scale)
  if steps:
    config = SolverConfig(tol=0.0, learning_rate=lr, steps_per_call=chunk,
                          driver="python" if driver == "python" else "while_loop")
    v = engine.solve(PROBLEM, config, v, _Data(y), _Shared(block, jnp.asarray(penalty, y.dtype)),
                     method=ADAM_PENALTY, budget=steps).u
  return v["x"], _diagnostics(block, y, v, steps, tol)
