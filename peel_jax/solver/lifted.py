"""The paper's lifted formulation of a block inversion, for every block kind.

Each lifted activation ``a = act(u)`` of a ReLU-family activation becomes two non-negative images with disjoint
supports, ``u = p - n``, ``p, n >= 0``, ``p * n = 0``, and ``a = p - slope * n`` (``slope = 0`` for ReLU, the
negative slope for leaky ReLU / PReLU). For the paper block this is (arXiv 2504.06410, eq. 3)

    min_{x,p,n}  || y - S(x) - A2(p) ||^2
    s.t.         A1(x) = p - n,   p >= 0,   n >= 0,   p * n = 0.

Generalised here to every kind of :mod:`peel_jax.blocks`:

* ``basic``: one lifted site (``act1``); ``bottleneck``: two (``act1``, ``act2``); ``preact``: two (``act0`` on the
  folded BN0, ``act1``); ``stem``: one (``relu``), followed by the pooling.
* The post-add activation is not lifted: the fit term is ``|| act(z) - y ||^2``, which for a ReLU is exactly
  ``z = y`` where ``y > 0`` and ``z <= 0`` where ``y = 0``.

Variables are a pytree ``{'x': (H, W, C), 'p': tuple, 'n': tuple}`` for ONE image (no batch axis); the functions
here are ``vmap``-ed by callers.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from peel_jax.blocks import Block, pool

LIFTABLE = ("relu", "leaky_relu", "prelu")


class LiftedEval(NamedTuple):
  """Evaluation of the lifted problem at one point.

  Attributes:
    out: the block output the lifted variables produce, ``(Ho, Wo, Co)``.
    eq: per lifted site, ``u_k - (p_k - n_k)`` (equality residuals).
    comp: per lifted site, ``p_k * n_k`` (complementarity, ``>= 0`` on the bounds).
  """

  out: jax.Array
  eq: tuple
  comp: tuple


def sites(block: Block) -> tuple[str, ...]:
  """The lifted activation sites of ``block``, in forward order."""
  kind = block.spec.kind
  if kind == "stem":
    return ("relu",)
  if kind == "preact":
    return ("act0", "act1")
  return tuple(f"act{i + 1}" for i in range(len(block.spec.kernels) - 1))


def liftable(block: Block) -> bool:
  """Whether the block's activation can be lifted (ReLU family)."""
  return block.spec.activation in LIFTABLE


def _ch(v, x):
  return jnp.reshape(v, (1,) * (x.ndim - 1) + (-1,))


def _slope(block: Block, site: str):
  a = block.spec.activation
  if a == "relu":
    return 0.0
  if a == "leaky_relu":
    return block.spec.negative_slope
  s = block.params["slopes"][site]
  return jnp.reshape(s, (1,) * 2 + (-1,))  # one image: (H, W, C)


def _lifted_act(block: Block, site: str, p, n):
  return p - _slope(block, site) * n if block.spec.activation != "relu" else p


def _b(f, x):
  return f(x[None])[0]


def evaluate(block: Block, v: dict) -> LiftedEval:
  """Output, equality residuals and complementarity of the lifted variables ``v`` (one image)."""
  if not liftable(block):
    raise ValueError(f"activation {block.spec.activation!r} cannot be lifted; lift only {LIFTABLE}")
  kind = block.spec.kind
  x, ps, ns = v["x"], v["p"], v["n"]
  eqs, comps = [], []

  def lift(k, u, site):
    eqs.append(u - (ps[k] - ns[k]))
    comps.append(ps[k] * ns[k])
    return _lifted_act(block, site, ps[k], ns[k])

  names = sites(block)
  if kind == "stem":
    u = _b(lambda t: block.affine(0, t), x)
    a = lift(0, u, names[0])
    out = _b(lambda t: pool(t, block.spec.pool), a)
    return LiftedEval(out, tuple(eqs), tuple(comps))
  if kind == "preact":
    pre = block.params["pre"]
    h = lift(0, x * _ch(pre["scale"], x) + _ch(pre["bias"], x), names[0])
    a = lift(1, _b(lambda t: block.affine(0, t), h), names[1])
    skip = _b(block.shortcut, h) if block.spec.shortcut == "conv" else x
    z = skip + _b(lambda t: block.affine(1, t), a)
  else:
    a = x
    nconv = len(block.spec.kernels)
    for i in range(nconv - 1):
      a = lift(i, _b(lambda t, i=i: block.affine(i, t), a), names[i])
    z = _b(block.shortcut, x) + _b(lambda t: block.affine(nconv - 1, t), a)
  if block.spec.post_activation:
    z = block.act(f"act{len(block.spec.kernels)}")(z)
  return LiftedEval(z, tuple(eqs), tuple(comps))


def pre_activations(block: Block, x: jax.Array) -> tuple:
  """The pre-activation images ``u_k`` at each lifted site for the input ``x`` (one image)."""
  kind = block.spec.kind
  us = []
  if kind == "stem":
    return (_b(lambda t: block.affine(0, t), x),)
  if kind == "preact":
    pre = block.params["pre"]
    u0 = x * _ch(pre["scale"], x) + _ch(pre["bias"], x)
    h = block.act("act0")(u0)
    return (u0, _b(lambda t: block.affine(0, t), h))
  a = x
  for i, site in enumerate(sites(block)):
    u = _b(lambda t, i=i: block.affine(i, t), a)
    us.append(u)
    a = block.act(site)(u)
  return tuple(us)


def lift_input(block: Block, x: jax.Array) -> dict:
  """Lifted variables that are exactly consistent with the input ``x``: ``p = relu(u)``, ``n = relu(-u)``."""
  us = pre_activations(block, x)
  return {"x": x, "p": tuple(jax.nn.relu(u) for u in us), "n": tuple(jax.nn.relu(-u) for u in us)}


def zeros_like_lifted(block: Block, x_shape: tuple[int, ...], dtype=jnp.float32) -> dict:
  """A zero pytree of the lifted variables' shapes for an input of shape ``x_shape`` (one image)."""
  shapes = jax.eval_shape(lambda x: pre_activations(block, x), jax.ShapeDtypeStruct(x_shape, dtype))
  return {
      "x": jnp.zeros(x_shape, dtype),
      "p": tuple(jnp.zeros(s.shape, dtype) for s in shapes),
      "n": tuple(jnp.zeros(s.shape, dtype) for s in shapes),
  }
