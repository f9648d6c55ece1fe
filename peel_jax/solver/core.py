"""The augmented-Lagrangian block inverter: problem, state, one iteration, drivers.

Per image, with ``s = ||y||`` the scale (every term is relative), the problem is

    min_u  0.5 * || E(u) ||^2 / s^2
    s.t.   C(u) = 0          (lifted formulation only: u_k = p_k - n_k and p_k * n_k = 0 at every lifted site)
           G(u) <= 0         (z <= 0 where a post-add ReLU output is 0)
           lo <= x <= hi     (x >= 0 where the input is a ReLU output; the pixel box for the stem), and
           p, n >= 0         (lifted formulation): simple bounds, kept by projection and an active set

where ``E`` is the output equation (``z - y`` where ``y > 0`` behind a post-add ReLU; ``z - act^{-1}(y)`` behind an
invertible leaky/PReLU; ``act(z) - y`` behind GELU; ``z - y`` without post-add activation). The augmented
Lagrangian (Rockafellar's form for inequalities; Nocedal & Wright, *Numerical Optimization*, Ch. 17) is a sum of
squares,

    L(u; lam, mu, rho) = 0.5 ||E/s||^2 + rho/2 ||C/s + lam/rho||^2 + rho/2 ||max(0, G/s + mu/rho)||^2,

so the in-house inner step is Levenberg-Marquardt on that residual vector (:mod:`peel_jax.solver.lm`). Every
``inner_iters`` inner steps: ``lam += rho C/s``, ``mu = max(0, mu + rho G/s)``, and ``rho *= rho_growth`` when the
violation did not fall by 4x. Each image carries its own ``(u, lam, mu, rho)``, inner state and flags; converged
images are frozen by masks, so no image's difficulty changes another's result.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxopt
import optax

from peel_jax.blocks import Block
from peel_jax.solver import info as _info
from peel_jax.solver import lifted, lm
from peel_jax.solver.config import SolverConfig

tree = jax.tree_util


# --- the problem --------------------------------------------------------------------------------------------------


class Problem(NamedTuple):
  """Static-shape data of one image's problem."""

  y: jax.Array  # (Ho, Wo, Co)
  target: jax.Array  # what z must equal on eq_mask
  eq_mask: jax.Array  # bool, where the output equation holds
  zero_mask: jax.Array  # bool, where z <= 0 is the constraint (post-add ReLU outputs that are 0)
  scale: jax.Array  # ||y||
  unit: jax.Array  # rms(y), for products p * n
  lo: jax.Array  # lower bound on x, broadcast to x's shape (-inf if none)
  hi: jax.Array  # upper bound on x (+inf if none)


def make_problem(block: Block, y: jax.Array, box) -> Problem:
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
  return Problem(y, target, eq_mask, zero_mask, scale, unit, lo, hi)


def _b(f, x):
  return f(x[None])[0]


def _z_reduced(block: Block, x):
  if block.spec.kind == "stem":
    return _b(block, x)
  return _b(block.pre_activation, x)


def _output_eq(block: Block, prob: Problem, z):
  spec = block.spec
  if spec.kind != "stem" and spec.post_activation and spec.activation == "gelu":
    return jnp.where(prob.eq_mask, block.act(f"act{len(spec.kernels)}")(z) - prob.y, 0.0)
  return jnp.where(prob.eq_mask, z - prob.target, 0.0)


def constraints(block: Block, prob: Problem, u, formulation: str):
  """``(E, C, G)``: output equation, equality constraints (pytree), inequality constraints (pytree), all scaled."""
  s = prob.scale
  if formulation == "lifted":
    ev = lifted.evaluate(_unpost(block), u)
    z = ev.out
    cons = {"eq": tuple(e / s for e in ev.eq), "comp": tuple(c / (s * prob.unit) for c in ev.comp)}
    x = u["x"]
  else:
    z = _z_reduced(block, u["x"])
    cons = {}
    x = u["x"]
  e = _output_eq(block, prob, z) / s
  g = {"zero": jnp.where(prob.zero_mask, z, 0.0) / s}
  return e, cons, g


def _unpost(block: Block) -> Block:
  """The block without its post-add activation (its output is ``z``); the stem is returned as is."""
  if block.spec.kind == "stem" or not block.spec.post_activation:
    return block
  import dataclasses

  return Block(block.params, dataclasses.replace(block.spec, post_activation=False))


def al_residual(block, prob, formulation, u, lam, mu, rho):
  """The augmented Lagrangian as a residual vector (pytree): ``L = 0.5 ||R||^2`` up to a constant."""
  e, c, g = constraints(block, prob, u, formulation)
  sr = jnp.sqrt(rho)
  rc = tree.tree_map(lambda ci, li: sr * (ci + li / rho), c, lam)
  rg = tree.tree_map(lambda gi, mi: sr * jax.nn.relu(gi + mi / rho), g, mu)
  return {"e": e, "c": rc, "g": rg}


def violation(block, prob, formulation, u):
  _, c, g = constraints(block, prob, u, formulation)
  v = jnp.zeros((), prob.y.dtype)
  for leaf in tree.tree_leaves(c):
    v = jnp.maximum(v, jnp.max(jnp.abs(leaf)))
  for leaf in tree.tree_leaves(g):
    v = jnp.maximum(v, jnp.max(leaf))
  return v


def bounds(u, prob: Problem, formulation: str):
  """Simple bounds, kept by projection and an active set: ``lo <= x <= hi`` and ``p, n >= 0`` (lifted).

  Bounds on ``x`` as hard bounds rather than AL inequalities: the iterate is always feasible, and measured here
  the He-scale paper block solves to 1e-6 with them while the soft form converges more slowly.
  """
  lower = {"x": prob.lo.astype(u["x"].dtype)}
  upper = {"x": prob.hi.astype(u["x"].dtype)}
  if formulation == "lifted":
    lower.update(p=tuple(jnp.zeros_like(a) for a in u["p"]), n=tuple(jnp.zeros_like(a) for a in u["n"]))
    upper.update(p=tuple(jnp.full_like(a, jnp.inf) for a in u["p"]), n=tuple(jnp.full_like(a, jnp.inf) for a in u["n"]))
  return lower, upper


# --- initialisation -----------------------------------------------------------------------------------------------


def initial_input(block: Block, y: jax.Array, x_shape, key, config: SolverConfig, prob: Problem):
  """The start ``x0`` for one image (see :class:`SolverConfig`, ``init``)."""
  kind = config.init
  if kind == "auto":
    if block.spec.kind == "stem":
      kind = "zeros"
    elif block.spec.shortcut == "identity":
      kind = "observation"
    else:
      return _shortcut_preimage(block, y, x_shape, prob)
  if kind == "observation":
    if tuple(y.shape) != tuple(x_shape):
      return _shortcut_preimage(block, y, x_shape, prob) if block.spec.shortcut == "conv" else jnp.zeros(x_shape, y.dtype)
    x0 = y
  elif kind == "zeros":
    x0 = jnp.zeros(x_shape, y.dtype)
  else:
    x0 = config.init_scale * jax.random.normal(key, x_shape, y.dtype)
  return jnp.clip(x0, prob.lo, prob.hi)


def _shortcut_preimage(block: Block, y, x_shape, prob: Problem, iters: int = 10):
  """Least-norm ``x`` with ``S(x) ~ y`` (the residual branch treated as noise), by CGLS on the 1x1 shortcut."""
  if block.spec.shortcut != "conv":
    return jnp.zeros(x_shape, y.dtype)
  zero = jnp.zeros(x_shape, y.dtype)
  r0, jv = jax.linearize(lambda x: _b(block.shortcut, x), zero)
  jt = jax.linear_transpose(jv, zero)
  x = lm.cgls(jv, lambda w: jt(w)[0], r0 - y, 0.0, iters, zero)
  return jnp.clip(x, prob.lo, prob.hi)


# --- state and one iteration --------------------------------------------------------------------------------------


class State(NamedTuple):
  u: Any
  lam: Any
  mu: Any
  rho: jax.Array
  inner: Any
  k: jax.Array
  prev_violation: jax.Array
  best_x: jax.Array
  best_res: jax.Array
  res: jax.Array
  done: jax.Array
  diverged: jax.Array


def _merit_fn(block, prob, config):
  def merit(u, lam, mu, rho):
    r = al_residual(block, prob, config.formulation, u, lam, mu, rho)
    return 0.5 * lm.tdot(r, r)

  return merit


def _lbfgsb(block, prob, config):
  return jaxopt.LBFGSB(fun=_merit_fn(block, prob, config), maxiter=config.inner_iters, tol=0.0, history_size=10)


def _inner_init(block, prob, config, u, lam, mu, rho):
  if config.inner == "lm":
    return lm.init(config.damping, prob.y.dtype)
  if config.inner == "adam":
    return optax.adam(config.learning_rate).init(u)
  lower, upper = bounds(u, prob, config.formulation)
  return _lbfgsb(block, prob, config).init_state(u, (lower, upper), lam, mu, rho)


def _inner_step(block, prob, config, u, lam, mu, rho, st):
  lower, upper = bounds(u, prob, config.formulation)
  if config.inner == "lm":
    res_fn = lambda v: al_residual(block, prob, config.formulation, v, lam, mu, rho)
    return lm.step(res_fn, u, lower, upper, st, config.cg_iters)
  if config.inner == "adam":
    g = jax.grad(_merit_fn(block, prob, config))(u, lam, mu, rho)
    upd, st = optax.adam(config.learning_rate).update(g, st, u)
    u = optax.apply_updates(u, upd)
    return tree.tree_map(jnp.clip, u, lower, upper), st
  solver = _lbfgsb(block, prob, config)
  u, st = solver.update(u, st, (lower, upper), lam, mu, rho)
  return u, st


def _true_residual(block, prob, x):
  x = jnp.clip(x, prob.lo, prob.hi)
  r = _b(block, x) - prob.y
  return jnp.sqrt(jnp.sum(r * r)) / prob.scale


def init_state(block: Block, y, x0, key, config: SolverConfig, box) -> State:
  """The solver state of one image."""
  prob = make_problem(block, y, box)
  x_shape = block.input_shape((1, *y.shape))[1:]
  if x0 is None:
    x0 = initial_input(block, y, x_shape, key, config, prob)
  u = lifted.lift_input(_unpost(block), x0) if config.formulation == "lifted" else {"x": x0}
  _, c, g = constraints(block, prob, u, config.formulation)
  lam = tree.tree_map(jnp.zeros_like, c)
  mu = tree.tree_map(jnp.zeros_like, g)
  rho = jnp.asarray(config.rho, y.dtype)
  res = _true_residual(block, prob, x0)
  return State(
      u=u,
      lam=lam,
      mu=mu,
      rho=rho,
      inner=_inner_init(block, prob, config, u, lam, mu, rho),
      k=jnp.zeros((), jnp.int32),
      prev_violation=jnp.asarray(jnp.inf, y.dtype),
      best_x=jnp.clip(x0, prob.lo, prob.hi),
      best_res=jnp.where(jnp.isfinite(res), res, jnp.inf),
      res=res,
      done=jnp.isfinite(res) & (res <= config.tol),
      diverged=jnp.zeros((), bool),
  )


def iterate(block: Block, y, box, config: SolverConfig, st: State) -> State:
  """One inner step (and, every ``inner_iters`` steps, a multiplier update) for one image; frozen once done."""
  prob = make_problem(block, y, box)
  u, inner = _inner_step(block, prob, config, st.u, st.lam, st.mu, st.rho, st.inner)
  k = st.k + 1
  outer = (k % config.inner_iters) == 0
  _, c, g = constraints(block, prob, u, config.formulation)
  lam_new = tree.tree_map(lambda li, ci: li + st.rho * ci, st.lam, c)
  mu_new = tree.tree_map(lambda mi, gi: jnp.maximum(0.0, mi + st.rho * gi), st.mu, g)
  viol = violation(block, prob, config.formulation, u)
  rho_new = jnp.where(viol > 0.25 * st.prev_violation, jnp.minimum(st.rho * config.rho_growth, config.rho_max), st.rho)
  pick = lambda a, b: tree.tree_map(lambda p, q: jnp.where(outer, p, q), a, b)
  lam, mu, rho = pick(lam_new, st.lam), pick(mu_new, st.mu), jnp.where(outer, rho_new, st.rho)
  prev_violation = jnp.where(outer, viol, st.prev_violation)
  if config.inner != "lm":  # the merit changed: restart the inner method's memory
    inner = pick(_inner_init(block, prob, config, u, lam, mu, rho), inner)
  x = u["x"]
  res = _true_residual(block, prob, x)
  finite = jnp.isfinite(res) & jnp.all(jnp.isfinite(x))
  better = finite & (res < st.best_res)
  new = State(
      u=u,
      lam=lam,
      mu=mu,
      rho=rho,
      inner=inner,
      k=k,
      prev_violation=prev_violation,
      best_x=jnp.where(better, jnp.clip(x, prob.lo, prob.hi), st.best_x),
      best_res=jnp.where(better, res, st.best_res),
      res=res,
      done=(finite & (res <= config.tol)) | ~finite,
      diverged=~finite,
  )
  # Masks: a finished image keeps its state exactly.
  return tree.tree_map(lambda a, b: jnp.where(st.done, a, b), st, new)


# --- batched, jitted entry points ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def init_batch(block, y, x0, keys, box, config: SolverConfig) -> State:
  if x0 is None:
    return jax.vmap(lambda yy, kk: init_state(block, yy, None, kk, config, box))(y, keys)
  return jax.vmap(lambda yy, xx, kk: init_state(block, yy, xx, kk, config, box))(y, x0, keys)


def _budgeted_step(block, y, box, config: SolverConfig, st: State) -> State:
  """One iteration for every image of the batch; an image that has spent ``max_iters`` keeps its state."""
  new = jax.vmap(lambda yy, ss: iterate(block, yy, box, config, ss))(y, st)
  budget = st.k < config.max_iters
  return tree.tree_map(lambda a, b: jnp.where(_bcast(budget, a), a, b), new, st)


@functools.partial(jax.jit, static_argnames=("config", "steps"))
def iterate_batch(block, y, box, st: State, config: SolverConfig, steps: int = 1) -> State:
  """``steps`` iterations (unrolled) for every image of the batch, within the iteration budget."""
  for _ in range(steps):
    st = _budgeted_step(block, y, box, config, st)
  return st


def _run_while(block, y, box, st, config):
  def cond(s):
    return jnp.any(~s.done & (s.k < config.max_iters))

  return jax.lax.while_loop(cond, lambda s: _budgeted_step(block, y, box, config, s), st)


def _bcast(mask, a):
  return mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))


solve_while = jax.jit(_run_while, static_argnames=("config",))


def resolve_driver(config: SolverConfig) -> str:
  if config.driver != "auto":
    return config.driver
  return "python" if jax.default_backend() == "cpu" else "while_loop"


def solve_batch(block: Block, y, x0, key, config: SolverConfig, box=None):
  """Solves every image of ``y`` ``(N, Ho, Wo, Co)``; returns ``(x_hat, InversionInfo)``."""
  box_arr = None if box is None else (jnp.asarray(box[0], y.dtype), jnp.asarray(box[1], y.dtype))
  keys = jax.random.split(key, y.shape[0])
  st = init_batch(block, y, x0, keys, box_arr, config)
  driver = resolve_driver(config)
  if driver == "while_loop" or isinstance(y, jax.core.Tracer):
    st = solve_while(block, y, box_arr, st, config)
  else:
    while not jax.device_get(jnp.all(st.done | (st.k >= config.max_iters))):
      st = iterate_batch(block, y, box_arr, st, config, steps=config.steps_per_call)
  return finalize(block, y, st, config, box_arr)


def finalize(block, y, st: State, config: SolverConfig, box):
  """``(x_hat, info)`` from a final state: the best iterate by true residual, with honest diagnostics."""
  x_hat = st.best_x
  res = _info.relative_residual(block, x_hat, y)

  def viol_gap(yy, u):
    prob = make_problem(block, yy, box)
    xb = _info.x_bound_violation(block, u["x"], (prob.lo, prob.hi))
    if config.formulation == "lifted":
      v, gap = _info.lifted_violation(_unpost(block), u, (prob.lo, prob.hi))
      return jnp.maximum(v, xb) / prob.unit, gap / prob.unit**2
    z = _z_reduced(block, u["x"])
    zv = jnp.max(jnp.where(prob.zero_mask, z, 0.0))
    return jnp.maximum(xb, jnp.maximum(zv, 0.0)) / prob.unit, jnp.zeros((), yy.dtype)

  viol, gap = jax.vmap(viol_gap)(y, st.u)
  finite = jnp.all(jnp.isfinite(x_hat.reshape(x_hat.shape[0], -1)), axis=1) & jnp.isfinite(res)
  return x_hat, _info.InversionInfo(
      residual=res,
      max_violation=viol,
      comp_gap=gap,
      iterations=st.k,
      converged=finite & (res <= config.tol * 1.0001) & ~st.diverged,
      diverged=st.diverged | ~finite,
  )
