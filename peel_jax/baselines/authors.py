"""The PEEL authors' at-scale block solver, reimplemented in JAX as the baseline.

As described in arXiv 2504.06410 (Sec. 5) for real ResNets: the lifted problem of
:mod:`peel_jax.solver.lifted` with every constraint moved into a fixed quadratic penalty,

    min_{x,p,n}  || out(x, p, n) - y ||^2 + mu * sum_k ( || A_k(.) - (p_k - n_k) ||^2 + || p_k * n_k ||^2 ),

``mu = 1e2``, Adam with learning rate 0.01 for 1000 steps, ``p`` and ``n`` clamped at zero after every step, every
variable initialised at ``1e-3 * N(0, I)``, one image at a time (here ``vmap``-ed: each image has its own Adam state,
so batching changes no image's result).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from peel_jax.blocks import Block
from peel_jax.solver import info as _info
from peel_jax.solver import lifted


def _loss(block, v, y, penalty):
  ev = lifted.evaluate(block, v)
  fit = jnp.sum((ev.out - y) ** 2)
  pen = sum(jnp.sum(e * e) for e in ev.eq) + sum(jnp.sum(c * c) for c in ev.comp)
  return fit + penalty * pen


@functools.partial(jax.jit, static_argnames=("steps",))
def _solve(block, y, key, steps, lr, penalty, init_scale):
  """One image: y ``(Ho, Wo, Co)``."""
  template = lifted.zeros_like_lifted(block, block.input_shape(y.shape), y.dtype)
  leaves, tree = jax.tree.flatten(template)
  keys = jax.random.split(key, len(leaves))
  v = tree.unflatten([init_scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
  opt = optax.adam(lr)
  state = opt.init(v)

  def step(_, carry):
    v, state = carry
    g = jax.grad(_loss, argnums=1)(block, v, y, penalty)
    upd, state = opt.update(g, state, v)
    v = optax.apply_updates(v, upd)
    v = {"x": v["x"], "p": tuple(jax.nn.relu(p) for p in v["p"]), "n": tuple(jax.nn.relu(n) for n in v["n"])}
    return v, state

  v, _ = jax.lax.fori_loop(0, steps, step, (v, state))
  return v


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
) -> tuple[jax.Array, _info.InversionInfo]:
  """Inverts ``block`` at a batch ``y`` ``(N, Ho, Wo, Co)`` with the authors' penalty + Adam method.

  Returns:
    ``(x_hat, info)``: ``x_hat`` of shape ``block.input_shape(y.shape)``; :class:`InversionInfo` per image
    (``converged`` means the relative residual reached ``tol``, which this method rarely does).
  """
  if y.ndim != 4:
    raise ValueError(f"y must be a batch (N, H, W, C), got shape {y.shape}")
  keys = jax.random.split(key, y.shape[0])
  v = jax.vmap(lambda yy, kk: _solve(block, yy, kk, steps, lr, penalty, init_scale))(y, keys)
  x_hat = v["x"]
  res = _info.relative_residual(block, x_hat, y)
  viol, gap = jax.vmap(lambda vv: _info.lifted_violation(block, vv))(v)
  finite = jnp.all(jnp.isfinite(x_hat.reshape(x_hat.shape[0], -1)), axis=1)
  n = y.shape[0]
  return x_hat, _info.InversionInfo(
      residual=res,
      max_violation=viol,
      comp_gap=gap,
      iterations=jnp.full((n,), steps, jnp.int32),
      converged=finite & (res <= tol),
      diverged=~finite,
  )
