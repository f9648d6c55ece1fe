"""Is a block's input determined by its output? Evidence per image, for the practitioner.

For an identity-shortcut block ``y = x + F(x)`` without post-add activation, ``F`` a contraction (Lipschitz constant
below 1) makes ``x -> x + F(x)`` injective, and the fixed point of ``x <- y - F(x)`` is the unique preimage (Banach;
Behrmann et al., "Invertible Residual Networks", ICML 2019). Since ReLU-family activations are 1-Lipschitz, the
product of the spectral norms of the branch's affine maps bounds ``Lip(F)`` from above (``global_bound``). The
spectral norm of ``F``'s Jacobian at the solution (``local_lipschitz``, by power iteration on ``J^T J`` with
``jax.jvp``/``jax.vjp``) tells whether the block is a contraction near the recovered input.

Where neither certifies uniqueness, several exact preimages reached from different starts are the evidence
against it: if two of them differ, the block is not injective there and the distance says by how much.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peel_jax.blocks import Block

STATUSES = ("determined", "locally_contractive", "not_injective", "underdetermined", "no_other_preimage_found", "unknown")


class Certificate(NamedTuple):
  """Per-image evidence on whether ``x_hat`` is *the* input (leading axis = batch).

  Attributes:
    status: per image, one of :data:`STATUSES`:
      ``determined`` (identity block, no post-add activation, ``global_bound < 1``: the preimage is unique);
      ``locally_contractive`` (``local_lipschitz < 1`` but the global bound does not certify);
      ``not_injective`` (two exact preimages from different starts differ by more than ``spread_tol``);
      ``underdetermined`` (fewer outputs than inputs: stride 2 or the stem; the preimage set is not a point);
      ``no_other_preimage_found`` (every start reached the same preimage, without a contraction proof);
      ``unknown`` (no evidence either way).
    local_lipschitz: spectral norm of the residual branch's Jacobian at ``x_hat`` (NaN where not applicable).
    global_bound: product of the spectral norms of the branch's affine maps (same for every image).
    spread: largest relative distance ``||x_i - x_j|| / ||x_hat||`` between exact preimages from several starts
      (NaN when no starts were run).
    exact_starts: how many starts reached an exact preimage (relative residual <= ``exact_tol``).
  """

  status: list
  local_lipschitz: np.ndarray
  global_bound: float
  spread: np.ndarray
  exact_starts: np.ndarray


def _power_iteration(f, x, key, iters):
  """Largest singular value of the Jacobian of ``f`` at ``x`` (one image)."""
  _, vjp = jax.vjp(f, x)
  v = jax.random.normal(key, x.shape, x.dtype)
  v = v / jnp.linalg.norm(v)

  def body(_, carry):
    v, _ = carry
    jv = jax.jvp(f, (x,), (v,))[1]
    w = vjp(jv)[0]
    s = jnp.sqrt(jnp.linalg.norm(w))
    return w / jnp.maximum(jnp.linalg.norm(w), 1e-30), s

  _, s = jax.lax.fori_loop(0, iters, body, (v, jnp.zeros((), x.dtype)))
  return s


def _conv_spectral_norm(block: Block, i: int, in_shape, key, iters: int):
  """Spectral norm of the linear part of branch convolution ``i`` on inputs of ``in_shape`` (one image)."""
  lin = lambda t: block.affine(i, t[None])[0] - block.affine(i, jnp.zeros_like(t)[None])[0]
  return _power_iteration(lin, jnp.zeros(in_shape, jnp.float32), key, iters)


def branch_lipschitz_bound(block: Block, x_shape, *, key=None, iters: int = 30) -> float:
  """Upper bound of ``Lip(F)``: the product of the branch's affine spectral norms (activations are 1-Lipschitz).

  Args:
    x_shape: the block's input shape for ONE image ``(H, W, C)`` (the norms of convolutions depend on the size).
  """
  if block.spec.kind == "stem":
    return float("nan")
  key = jax.random.key(0) if key is None else key
  shape = tuple(x_shape)
  bound = 1.0
  if block.spec.kind == "preact":
    bound *= float(jnp.max(jnp.abs(block.params["pre"]["scale"])))
  if block.spec.activation == "gelu":
    bound *= 1.13  # max |gelu'(u)| is about 1.129
  elif block.spec.activation == "prelu":
    bound *= max(1.0, max(float(jnp.max(jnp.abs(s))) for s in block.params["slopes"].values()))
  for i in range(len(block.spec.kernels)):
    key, sub = jax.random.split(key)
    bound *= float(_conv_spectral_norm(block, i, shape, sub, iters))
    shape = jax.eval_shape(lambda t, i=i: block.affine(i, t[None])[0], jax.ShapeDtypeStruct(shape, jnp.float32)).shape
  return bound


def local_lipschitz(block: Block, x_hat: jax.Array, *, key=None, iters: int = 30) -> jax.Array:
  """Spectral norm of the residual branch's Jacobian at each image of ``x_hat`` (batched NHWC)."""
  key = jax.random.key(0) if key is None else key
  if block.spec.kind == "preact":
    f = lambda t: block.branch(block.pre(t[None]))[0]
  else:
    f = lambda t: block.branch(t[None])[0]
  keys = jax.random.split(key, x_hat.shape[0])
  return jax.jit(jax.vmap(lambda x, k: _power_iteration(f, x, k, iters)))(x_hat, keys)


def certify_block(
    block: Block,
    x_hat: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array | None = None,
    starts: int = 0,
    start_scale: float = 1.0,
    exact_tol: float = 1e-4,
    spread_tol: float = 1e-3,
    power_iters: int = 30,
    solver_kwargs: dict[str, Any] | None = None,
) -> Certificate:
  """Evidence on whether each recovered input is determined by the observation.

  Args:
    block: the inverted block.
    x_hat: recovered inputs ``(N, H, W, C)``.
    y: the observation ``(N, Ho, Wo, Co)``.
    key: PRNG key for power iterations and random starts.
    starts: number of extra starts for :func:`peel_jax.invert_block` (``x0 = x_hat + start_scale * rms(x_hat) *
      N(0, I)``, projected where the architecture bounds the input); 0 skips the multistart test.
    exact_tol: a start counts as an exact preimage when its relative residual is at most this.
    spread_tol: relative distance above which two exact preimages count as different.
    solver_kwargs: extra keyword arguments for :func:`peel_jax.invert_block` (e.g. ``config``).

  Returns:
    A :class:`Certificate`.
  """
  from peel_jax._invert_block import invert_block  # local: invert_block imports this module's users

  key = jax.random.key(0) if key is None else key
  k_loc, k_glob, k_starts = jax.random.split(key, 3)
  n = x_hat.shape[0]
  spec = block.spec
  out_dim = int(np.prod(y.shape[1:]))
  in_dim = int(np.prod(x_hat.shape[1:]))
  residual_block = spec.kind != "stem"
  if residual_block:
    loc = np.asarray(local_lipschitz(block, x_hat, key=k_loc, iters=power_iters))
    glob = branch_lipschitz_bound(block, x_hat.shape[1:], key=k_glob, iters=power_iters)
  else:
    loc, glob = np.full((n,), np.nan), float("nan")
  spread = np.full((n,), np.nan)
  exact = np.zeros((n,), np.int64)
  if starts > 0:
    from peel_jax.solver.info import relative_residual

    base_res = np.asarray(relative_residual(block, x_hat, y))
    sols = [np.asarray(x_hat)]
    oks = [base_res <= exact_tol]
    scale = jnp.sqrt(jnp.mean(x_hat**2, axis=tuple(range(1, x_hat.ndim)), keepdims=True))
    for k in jax.random.split(k_starts, starts):
      x0 = x_hat + start_scale * scale * jax.random.normal(k, x_hat.shape, x_hat.dtype)
      if spec.input_nonneg:
        x0 = jnp.maximum(x0, 0.0)
      xs, inf = invert_block(block, y, x0=x0, key=k, **(solver_kwargs or {}))
      sols.append(np.asarray(xs))
      oks.append(np.asarray(inf.residual) <= exact_tol)
    sols, oks = np.stack(sols), np.stack(oks)
    norm = np.sqrt(np.sum(np.asarray(x_hat).reshape(n, -1) ** 2, 1)) + 1e-30
    exact = oks.sum(0)
    for i in range(n):
      good = sols[oks[:, i], i].reshape(int(oks[:, i].sum()), -1)
      if len(good) >= 2:
        d = np.sqrt(((good[:, None] - good[None]) ** 2).sum(-1)).max()
        spread[i] = d / norm[i]
  status = []
  for i in range(n):
    if out_dim < in_dim:
      status.append("underdetermined")
    elif not np.isnan(spread[i]) and spread[i] > spread_tol:
      status.append("not_injective")
    elif residual_block and spec.shortcut == "identity" and not spec.post_activation and glob < 1:
      status.append("determined")
    elif residual_block and not spec.post_activation and loc[i] < 1:
      status.append("locally_contractive")
    elif not np.isnan(spread[i]):
      status.append("no_other_preimage_found")
    else:
      status.append("unknown")
  return Certificate(status, loc, glob, spread, exact)
