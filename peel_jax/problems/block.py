"""A block inversion as an engine problem: the paper's problem, reduced or lifted, per image.

Per image, with ``s = ||y||`` the scale (every term is relative), the problem is

    min_u  0.5 * || E(u) ||^2 / s^2
    s.t.   C(u) = 0          (lifted formulation only: u_k = p_k - n_k and p_k * n_k = 0 at every lifted site)
           G(u) <= 0         (z <= 0 where a post-add ReLU output is 0)
           lo <= x <= hi     (x >= 0 where the input is a ReLU output; the pixel box for the stem), and
           p, n >= 0         (lifted formulation): simple bounds, kept by projection and an active set

where ``E`` is the output equation (``z - y`` where ``y > 0`` behind a post-add ReLU; ``z - act^{-1}(y)`` behind an
invertible leaky/PReLU; ``act(z) - y`` behind GELU; ``z - y`` without post-add activation). The engine
(:mod:`peel_jax.solver.engine`) solves it by the augmented Lagrangian with a Levenberg-Marquardt inner; the merit is
the true relative residual ``||block(clip(x)) - y|| / ||y||``. The bounds on ``x`` are hard (projection) rather than
AL inequalities: the iterate is always feasible, and measured here the He-scale paper block solves to 1e-6 with
them while the soft form converges more slowly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from peel_jax.blocks import Block
from peel_jax.solver import anderson, engine, lifted, lm
from peel_jax.solver import info as _info
from peel_jax.solver.config import SolverConfig

tree = jax.tree_util


class BlockData(NamedTuple):
  """Static-shape data of one image's block problem."""

  y: jax.Array  # (Ho, Wo, Co)
  target: jax.Array  # what z must equal on eq_mask
  eq_mask: jax.Array  # bool, where the output equation holds
  zero_mask: jax.Array  # bool, where z <= 0 is the constraint (post-add ReLU outputs that are 0)
  scale: jax.Array  # ||y||
  unit: jax.Array  # rms(y), for products p * n
  lo: jax.Array  # lower bound on x, broadcast to x's shape (-inf if none)
  hi: jax.Array  # upper bound on x (+inf if none)


def make_data(block: Block, y: jax.Array, box) -> BlockData:
  """One image's :class:`BlockData` from its observation ``y`` ``(Ho, Wo, Co)`` and the box ``(lo, hi)`` or None."""
  spec = block.spec
  eq_mask = jnp.ones(y.shape, bool)
  zero_mask = jnp.zeros(y.shape, bool)
  target = y
  if spec.post_activation:
    if spec.activation == "relu":
      zero_mask = y <= 0
      eq_mask = ~zero_mask
    elif spec.activation == "leaky_relu":
      target = jnp.where(y >= 0, y, y / spec.negative_slope)
    elif spec.activation == "prelu":
      slope = block.params["slopes"][f"act{len(spec.kernels)}"]
      target = jnp.where(y >= 0, y, y / jnp.reshape(slope, (1, 1, -1)))
  scale = jnp.maximum(jnp.sqrt(jnp.sum(y * y)), 1e-30)
  unit = jnp.maximum(scale / jnp.sqrt(y.size), 1e-30)
  x_shape = block.input_shape((1, *y.shape))[1:]
  lo = jnp.broadcast_to(jnp.asarray(-jnp.inf if box is None else box[0], y.dtype), x_shape)
  hi = jnp.broadcast_to(jnp.asarray(jnp.inf if box is None else box[1], y.dtype), x_shape)
  if spec.input_nonneg:
    lo = jnp.maximum(lo, 0.0)
  return BlockData(y, target, eq_mask, zero_mask, scale, unit, lo, hi)


def _b(f, x):
  return f(x[None])[0]


def unpost(block: Block) -> Block:
  """The block without its post-add activation (its output is ``z``); the stem is returned as is."""
  if block.spec.kind == "stem" or not block.spec.post_activation:
    return block
  return Block(block.params, dataclasses.replace(block.spec, post_activation=False))


def _z(block: Block, u, lifted_form: bool):
  if lifted_form:
    return lifted.evaluate(unpost(block), u).out
  if block.spec.kind == "stem":
    return _b(block, u["x"])
  return _b(block.pre_activation, u["x"])


def _residual(lifted_form, u, d: BlockData, block: Block):
  z = _z(block, u, lifted_form)
  spec = block.spec
  if spec.kind != "stem" and spec.post_activation and spec.activation == "gelu":
    e = jnp.where(d.eq_mask, block.act(f"act{len(spec.kernels)}")(z) - d.y, 0.0)
  else:
    e = jnp.where(d.eq_mask, z - d.target, 0.0)
  return e / d.scale


def _equality(u, d: BlockData, block: Block):
  ev = lifted.evaluate(unpost(block), u)
  return {"eq": tuple(e / d.scale for e in ev.eq), "comp": tuple(c / (d.scale * d.unit) for c in ev.comp)}


def _inequality(lifted_form, u, d: BlockData, block: Block):
  return {"zero": jnp.where(d.zero_mask, _z(block, u, lifted_form), 0.0) / d.scale}


def _bounds(u, d: BlockData, block: Block):
  lower = {"x": d.lo.astype(u["x"].dtype)}
  upper = {"x": d.hi.astype(u["x"].dtype)}
  if "p" in u:
    lower.update(p=tuple(jnp.zeros_like(a) for a in u["p"]), n=tuple(jnp.zeros_like(a) for a in u["n"]))
    upper.update(p=tuple(jnp.full_like(a, jnp.inf) for a in u["p"]), n=tuple(jnp.full_like(a, jnp.inf) for a in u["n"]))
  return lower, upper


def _merit(u, d: BlockData, block: Block):
  x = jnp.clip(u["x"], d.lo, d.hi)
  r = _b(block, x) - d.y
  return jnp.sqrt(jnp.sum(r * r)) / d.scale


def _terms(lifted_form, u, d: BlockData, block: Block):
  """``(E, C, G)`` from one forward (the residual and the inequality share ``z``)."""
  s = d.scale
  spec = block.spec
  if lifted_form:
    ev = lifted.evaluate(unpost(block), u)
    z = ev.out
    cons = {"eq": tuple(e / s for e in ev.eq), "comp": tuple(c / (s * d.unit) for c in ev.comp)}
  else:
    z = _z(block, u, False)
    cons = {}
  if spec.kind != "stem" and spec.post_activation and spec.activation == "gelu":
    e = jnp.where(d.eq_mask, block.act(f"act{len(spec.kernels)}")(z) - d.y, 0.0)
  else:
    e = jnp.where(d.eq_mask, z - d.target, 0.0)
  return e / s, cons, {"zero": jnp.where(d.zero_mask, z, 0.0) / s}


class BlockShared(NamedTuple):
  """What every image shares: the block and the box (``(lo, hi)`` arrays or ``None``)."""

  block: Block
  box: Any


def _on_y(f, u, y, sh: BlockShared):
  # The engine's per-image data is the observation itself; the problem's data is derived inside the compiled
  # step (as the solver always did), so the step's arithmetic, and its rounding, do not depend on the caller.
  return f(u, make_data(sh.block, y, sh.box), sh.block)


def _per_y(f):
  return functools.partial(_on_y, f)


def fixed_point_obstacle(block: Block) -> str | None:
  """Why ``block`` is not of the form ``y = x + F(x)`` (identity shortcut, no post-add activation, stride 1), or
  ``None`` when it is (then ``x`` is a fixed point of ``x <- y - F(x)``)."""
  spec = block.spec
  if spec.kind == "stem":
    return "the stem is not a residual block (y = pool(act(conv x)))"
  if spec.shortcut != "identity":
    return f"its shortcut is {spec.shortcut!r}, not the identity (y = S(x) + F(x) with a strided 1x1 conv S)"
  if spec.post_activation:
    return f"it applies a post-add {spec.activation} (y = act(x + F(x)))"
  if spec.stride != 1:
    return f"it has stride {spec.stride}"
  return None


def _square(block: Block, config: SolverConfig) -> bool:
  """The problem is ``x + F(x) = y`` over ``x`` alone: square, with a fixed-point form."""
  return config.formulation == "reduced" and fixed_point_obstacle(block) is None


def block_method(block: Block, config: SolverConfig) -> engine.Method:
  """The engine's update rule for ``block``: ``config.inner``, with ``'newton_gmres'`` on square blocks only
  (``y = x + F(x)``, reduced formulation) and Levenberg-Marquardt with CGLS on every other block."""
  return engine.default_method(config, _square(block, config))


def residual_branch(block: Block, x):
  """``F(x)`` of ``y = x + F(x)`` (batched NHWC): the branch, after the pre-activation for a pre-activation block."""
  return block.branch(block.pre(x)) if block.spec.kind == "preact" else block.branch(x)


def _fixed_point(u, d: BlockData, block: Block):
  """``(G(x), merit(x))`` with ``G(x) = y - F(x)``: ``block(x) - y = x - G(x)``, so one forward gives both."""
  g = d.y - _b(lambda t: residual_branch(block, t), u["x"])
  return {"x": g}, jnp.sqrt(jnp.sum((u["x"] - g) ** 2)) / d.scale


REDUCED = engine.Problem(residual=_per_y(functools.partial(_residual, False)), bounds=_per_y(_bounds),
                         merit=_per_y(_merit), inequality=_per_y(functools.partial(_inequality, False)),
                         terms=_per_y(functools.partial(_terms, False)))
LIFTED = engine.Problem(residual=_per_y(functools.partial(_residual, True)), bounds=_per_y(_bounds),
                        merit=_per_y(_merit), equality=_per_y(_equality),
                        inequality=_per_y(functools.partial(_inequality, True)),
                        terms=_per_y(functools.partial(_terms, True)))
PROBLEMS = {"reduced": REDUCED, "lifted": LIFTED}
FIXED_POINT = REDUCED._replace(fixed_point=_per_y(_fixed_point))


# --- the start ----------------------------------------------------------------------------------------------------


def initial_input(block: Block, y: jax.Array, x_shape, key, config: SolverConfig, d: BlockData):
  """The start ``x0`` for one image (see :class:`SolverConfig`, ``init``)."""
  kind = config.init
  if kind == "auto":
    if block.spec.kind == "stem":
      kind = "zeros"
    elif block.spec.shortcut == "identity":
      kind = "observation"
    else:
      return _shortcut_preimage(block, y, x_shape, d)
  if kind == "observation":
    if tuple(y.shape) != tuple(x_shape):
      return _shortcut_preimage(block, y, x_shape, d) if block.spec.shortcut == "conv" else jnp.zeros(x_shape, y.dtype)
    x0 = y
  elif kind == "zeros":
    x0 = jnp.zeros(x_shape, y.dtype)
  else:
    x0 = config.init_scale * jax.random.normal(key, x_shape, y.dtype)
  return jnp.clip(x0, d.lo, d.hi)


def _shortcut_preimage(block: Block, y, x_shape, d: BlockData, iters: int = 10):
  """Least-norm ``x`` with ``S(x) ~ y`` (the residual branch treated as noise), by CGLS on the 1x1 shortcut."""
  if block.spec.shortcut != "conv":
    return jnp.zeros(x_shape, y.dtype)
  zero = jnp.zeros(x_shape, y.dtype)
  r0, jv = jax.linearize(lambda x: _b(block.shortcut, x), zero)
  jt = jax.linear_transpose(jv, zero)
  x = lm.cgls(jv, lambda w: jt(w)[0], r0 - y, 0.0, iters, zero)
  return jnp.clip(x, d.lo, d.hi)


def _start(block, y, x0, key, config, box):
  d = make_data(block, y, box)
  if x0 is None:
    x0 = initial_input(block, y, block.input_shape((1, *y.shape))[1:], key, config, d)
  return lifted.lift_input(unpost(block), x0) if config.formulation == "lifted" else {"x": x0}


def init_batch(block, y, x0, keys, box, config: SolverConfig) -> engine.State:
  """The engine state of every image of ``y`` ``(N, Ho, Wo, Co)`` (``x0``: ``None`` or ``(N, H, W, C)``)."""
  if x0 is None:
    u0 = jax.vmap(lambda yy, kk: _start(block, yy, None, kk, config, box))(y, keys)
  else:
    u0 = jax.vmap(lambda yy, xx, kk: _start(block, yy, xx, kk, config, box))(y, x0, keys)
  return engine.batch_init(PROBLEMS[config.formulation], block_method(block, config), config, u0, y,
                           BlockShared(block, box))


_init_jit = jax.jit(init_batch, static_argnames=("config",))


FAST_PATH_MARGIN = 100.0


def _fast_path(block, y, st: engine.State, config: SolverConfig, box):
  """The fixed-point fast path from the AL start ``st``: ``(st, solved, iterations)``. Where the best fixed-point
  iterate solves the image (residual <= ``tol``) it becomes the image's result and the image is frozen (done); every
  other image keeps its AL start, so its result is exactly the AL path's. The fixed point aims at
  ``tol / FAST_PATH_MARGIN`` and stops at float32's rounding floor (see :mod:`peel_jax.solver.anderson`; a step costs
  one forward), so that its results are as exact as those of the AL path, whose superlinear last step lands well
  below ``tol``."""
  fp_config = dataclasses.replace(config, max_iters=config.fast_path_iters, tol=config.tol / FAST_PATH_MARGIN)
  fp = engine.solve(FIXED_POINT, fp_config, st.u, y, BlockShared(block, box), method=anderson.ANDERSON)
  return (_adopt if engine.is_traced(st, fp) else _adopt_jit)(st, fp, config.tol)


def _adopt(st: engine.State, fp: engine.State, tol):
  """``(st, solved, fp.k)``: ``st`` with the fixed point's best iterate adopted, and frozen, where it solved."""
  solved = fp.best_merit <= tol
  pick = lambda a, b: jax.tree_util.tree_map(lambda p, q: jnp.where(engine.bcast(solved, p), p, q), a, b)
  st = st._replace(u=pick(fp.best_u, st.u), best_u=pick(fp.best_u, st.best_u),
                   best_merit=jnp.where(solved, fp.best_merit, st.best_merit), done=st.done | solved)
  return st, solved, fp.k


_adopt_jit = jax.jit(_adopt)


def solve_batch(block: Block, y, x0, key, config: SolverConfig, box=None):
  """Solves every image of ``y`` ``(N, Ho, Wo, Co)``; returns ``(x_hat, InversionInfo)``."""
  box_arr = None if box is None else (jnp.asarray(box[0], y.dtype), jnp.asarray(box[1], y.dtype))
  keys = jax.random.split(key, y.shape[0])
  traced = engine.is_traced(block, y, x0, keys, box_arr)
  st = (init_batch if traced else _init_jit)(block, y, x0, keys, box_arr, config)
  solved = jnp.zeros(y.shape[:1], bool)
  fp_iters = jnp.zeros(y.shape[:1], jnp.int32)
  if config.fast_path == "auto" and _square(block, config):
    st, solved, fp_iters = _fast_path(block, y, st, config, box_arr)
  st = engine.run(PROBLEMS[config.formulation], block_method(block, config), config, y, BlockShared(block, box_arr),
                  st)
  return (_report if traced else _report_jit)(block, y, st, config, box_arr, solved, fp_iters)


def _report(block, y, st: engine.State, config: SolverConfig, box, solved, fp_iters):
  x_hat, inf = finalize(block, y, st, config, box)
  path = jnp.where(solved, _info.PATH_FIXED_POINT, _info.PATH_AL).astype(jnp.int32)
  return x_hat, inf._replace(iterations=inf.iterations + fp_iters, path=path)


_report_jit = jax.jit(_report, static_argnames=("config",))  # eagerly, its vmapped checks cost ~20 ms per call


def finalize(block, y, st: engine.State, config: SolverConfig, box):
  """``(x_hat, info)`` from a final state: the best iterate by true residual, with honest diagnostics."""
  x_hat = st.best_u["x"]
  res = _info.relative_residual(block, x_hat, y)

  def viol_gap(yy, u):
    d = make_data(block, yy, box)
    xb = _info.x_bound_violation(block, u["x"], (d.lo, d.hi))
    if config.formulation == "lifted":
      v, gap = _info.lifted_violation(unpost(block), u, (d.lo, d.hi))
      return jnp.maximum(v, xb) / d.unit, gap / d.unit**2
    if not (block.spec.post_activation and block.spec.activation == "relu"):  # no z <= 0 constraints (statically:
      return xb / d.unit, jnp.zeros((), yy.dtype)  # under jit, max over an all-false mask constant-folded for 3 s)
    zv = jnp.max(jnp.where(d.zero_mask, _z(block, u, False), 0.0))
    return jnp.maximum(xb, jnp.maximum(zv, 0.0)) / d.unit, jnp.zeros((), yy.dtype)

  viol, gap = jax.vmap(viol_gap)(y, st.u)
  finite = jnp.all(jnp.isfinite(x_hat.reshape(x_hat.shape[0], -1)), axis=1) & jnp.isfinite(res)
  return x_hat, _info.InversionInfo(
      residual=res, max_violation=viol, comp_gap=gap, iterations=st.k,
      converged=finite & (res <= config.tol * 1.0001) & ~st.diverged, diverged=st.diverged | ~finite)
