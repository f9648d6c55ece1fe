"""The PEEL authors' at-scale block solver, reimplemented in JAX as the baseline.

As described in arXiv 2504.06410 (Sec. 5) for real ResNets: the lifted problem of
:mod:`peel_jax.solver.lifted` with every constraint moved into a fixed quadratic penalty,

    min_{x,p,n}  || out(x, p, n) - y ||^2 + mu * sum_k ( || A_k(.) - (p_k - n_k) ||^2 + || p_k * n_k ||^2 ),

``mu = 1e2``, Adam with learning rate 0.01 for 1000 steps, ``p`` and ``n`` clamped at zero after every step, every
variable initialised at ``1e-3 * N(0, I)``, one image at a time (here ``vmap``-ed: each image has its own Adam state,
so batching changes no image's result).

Two drivers run the identical steps: ``'python'`` (default) calls a jitted chunk of ``chunk`` unrolled steps from
Python, as the authors' PyTorch loop did; ``'fori_loop'`` runs all steps in one ``lax.fori_loop``. On this CPU a
convolution inside an XLA loop body measured about 3x slower (``benchmarks.loop_overhead``), so timing the ``fori_loop`` driver would flatter
our solver.
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


def _init_one(block, y, key, init_scale):
  template = lifted.zeros_like_lifted(block, block.input_shape((1, *y.shape))[1:], y.dtype)
  leaves, tree = jax.tree.flatten(template)
  keys = jax.random.split(key, len(leaves))
  return tree.unflatten([init_scale * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _adam_step(block, y, penalty, lr, v, state):
  g = jax.grad(_loss, argnums=1)(block, v, y, penalty)
  upd, state = optax.adam(lr).update(g, state, v)
  v = optax.apply_updates(v, upd)
  v = {"x": v["x"], "p": tuple(jax.nn.relu(p) for p in v["p"]), "n": tuple(jax.nn.relu(n) for n in v["n"])}
  return v, state


@functools.partial(jax.jit, static_argnames=("lr",))
def _start(block, y, keys, init_scale, lr: float):
  v = jax.vmap(lambda yy, kk: _init_one(block, yy, kk, init_scale))(y, keys)
  return v, jax.vmap(optax.adam(lr).init)(v)


@functools.partial(jax.jit, static_argnames=("steps", "lr", "unroll"))
def _run(block, y, v, state, penalty, steps: int, lr: float, unroll: bool):
  """``steps`` Adam steps for every image (vmapped): unrolled, or in one ``fori_loop``."""

  def one(yy, vv, ss):
    if unroll:
      for _ in range(steps):
        vv, ss = _adam_step(block, yy, penalty, lr, vv, ss)
      return vv, ss
    return jax.lax.fori_loop(0, steps, lambda _, c: _adam_step(block, yy, penalty, lr, *c), (vv, ss))

  return jax.vmap(one)(y, v, state)


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
  v, state = _start(block, y, jax.random.split(key, y.shape[0]), init_scale, lr=lr)
  penalty = jnp.asarray(penalty, y.dtype)
  if driver == "fori_loop":
    v, state = _run(block, y, v, state, penalty, steps=steps, lr=lr, unroll=False)
  else:
    done = 0
    while done < steps:
      k = min(chunk, steps - done)
      v, state = _run(block, y, v, state, penalty, steps=k, lr=lr, unroll=True)
      done += k
  return v["x"], _diagnostics(block, y, v, steps, tol)
