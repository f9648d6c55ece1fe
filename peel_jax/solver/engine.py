"""The one solver engine: per-image augmented-Lagrangian state, masks, budget, best iterate, two drivers.

A problem is, per image, least squares plus constraints over a pytree ``u``:

    min_u  0.5 ||r(u)||^2 + 0.5 ||o(u)||^2     s.t.  c(u) = 0,   g(u) <= 0,   lo <= u <= hi,

with ``r`` the residual (the equations to fit, already scaled to be relative), ``o`` an optional objective written
as a least-squares vector (a prior), ``c`` equalities and ``g`` inequalities (pytrees, possibly empty) and simple
bounds kept by projection. The engine minimises the augmented Lagrangian (Rockafellar's form for inequalities;
Nocedal & Wright, *Numerical Optimization*, Ch. 17), itself a sum of squares,

    L(u; lam, mu, rho) = 0.5 ||r||^2 + 0.5 ||o||^2 + rho/2 ||c + lam/rho||^2 + rho/2 ||max(0, g + mu/rho)||^2,

with an inner :class:`Method` (Levenberg-Marquardt by default, :mod:`peel_jax.solver.lm`). Every ``inner_iters``
inner steps: ``lam += rho c``, ``mu = max(0, mu + rho g)``, and ``rho *= rho_growth`` (capped at ``rho_max``) when
the violation did not fall by 4x. Each image carries its own ``(u, lam, mu, rho)``, inner state, iteration count
and flags; an image is done when its ``merit`` (a true relative residual) is at most ``tol`` or a non-finite value
appeared, and a done image, or one that spent ``max_iters``, is frozen by masks: no image changes another's result.
The best iterate by merit (projected onto the bounds) is kept.

Drivers: ``'python'`` calls a jitted, vmapped step (``steps_per_call`` unrolled iterations) from Python until every
image is done (the CPU default: a convolution inside an XLA loop body measured about 3x slower there,
``benchmarks/RESULTS.md``); ``'while_loop'`` runs the same step in one ``lax.while_loop`` (the accelerator default,
and the only driver usable under ``jit``/``scan``: a traced input selects it automatically).

Problem functions take ``(u, data, shared)``: ``data`` is the pytree of one image's data (the engine ``vmap``s over
its leading axis), ``shared`` the pytree common to every image (weights). A :class:`Problem` or :class:`Method` is
a ``jit`` static argument: build it from module-level functions so that equal problems hash equal.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from peel_jax.solver import lm
from peel_jax.solver.config import SolverConfig

tree = jax.tree_util


class Problem(NamedTuple):
  """One image's problem as pure functions of ``(u, data, shared)`` (see the module docstring).

  Attributes:
    residual: the least-squares vector ``r(u)`` (pytree), without multipliers.
    bounds: ``(lo, hi)``, pytrees shaped like ``u`` (``-inf``/``inf`` where unbounded).
    merit: scalar, the true relative residual: best-iterate tracking and convergence (``merit <= tol``); ``None``:
      neither (the method spends its whole budget; use ``State.u``, the last iterate).
    equality: ``c(u)`` (pytree; ``c = 0``), or ``None``.
    inequality: ``g(u)`` (pytree; ``g <= 0``), or ``None``.
    objective: a prior as a least-squares vector ``o(u)``, or ``None``.
    terms: optional ``(r, c, g)`` in one evaluation, used instead of the three functions above when they share work
      (a block's residual and inequality share its forward; one evaluation also keeps the transposed Jacobian a
      single pass, and so the rounding, of the solver before the engine).
    fixed_point: optional ``G(u) -> (G(u), merit(u))``, a map whose fixed points are the problem's solutions, with
      the merit of ``u`` from the same evaluation (for :data:`peel_jax.solver.anderson.ANDERSON`).
  """

  residual: Callable
  bounds: Callable
  merit: Callable
  equality: Callable | None = None
  inequality: Callable | None = None
  objective: Callable | None = None
  terms: Callable | None = None
  fixed_point: Callable | None = None


class State(NamedTuple):
  """Per-image engine state (batched: a leading image axis on every leaf)."""

  u: Any
  lam: Any
  mu: Any
  rho: jax.Array
  inner: Any
  k: jax.Array
  prev_violation: jax.Array
  best_u: Any
  best_merit: jax.Array
  merit: jax.Array
  done: jax.Array
  diverged: jax.Array
  budget: jax.Array  # iterations this image may spend (config.max_iters unless given; traced: no recompilation)


def constraints(problem: Problem, u, data, shared):
  """``(c, g)``: equality and inequality pytrees (``{}`` where the problem has none)."""
  if problem.terms is not None:
    return problem.terms(u, data, shared)[1:]
  c = {} if problem.equality is None else problem.equality(u, data, shared)
  g = {} if problem.inequality is None else problem.inequality(u, data, shared)
  return c, g


def al_residual(problem: Problem, u, data, shared, lam, mu, rho):
  """The augmented Lagrangian as a residual pytree: ``L = 0.5 ||R||^2`` up to a constant."""
  if problem.terms is not None:
    e, c, g = problem.terms(u, data, shared)
  else:
    e = problem.residual(u, data, shared)
    c, g = constraints(problem, u, data, shared)
  sr = jnp.sqrt(rho)
  out = {"e": e,
         "c": tree.tree_map(lambda ci, li: sr * (ci + li / rho), c, lam),
         "g": tree.tree_map(lambda gi, mi: sr * jax.nn.relu(gi + mi / rho), g, mu)}
  if problem.objective is not None:
    out["o"] = problem.objective(u, data, shared)
  return out


def al_value(problem: Problem, u, data, shared, lam, mu, rho):
  r = al_residual(problem, u, data, shared, lam, mu, rho)
  return 0.5 * lm.tdot(r, r)


def violation(c, g, dtype):
  v = jnp.zeros((), dtype)
  for leaf in tree.tree_leaves(c):
    v = jnp.maximum(v, jnp.max(jnp.abs(leaf)))
  for leaf in tree.tree_leaves(g):
    v = jnp.maximum(v, jnp.max(leaf))
  return v


def box_bounds(box, shape, dtype):
  """``(lo, hi)`` arrays of ``shape``: ``box`` broadcast, or ``(-inf, inf)`` when ``box`` is ``None``."""
  if box is None:
    return jnp.full(shape, -jnp.inf, dtype), jnp.full(shape, jnp.inf, dtype)
  return tuple(jnp.broadcast_to(jnp.asarray(b, dtype), shape) for b in box)


def project(problem: Problem, u, data, shared):
  lo, hi = problem.bounds(u, data, shared)
  return tree.tree_map(jnp.clip, u, lo, hi)


# --- inner methods ------------------------------------------------------------------------------------------------


class Method(NamedTuple):
  """An update rule: ``init(problem, config, u, data, shared, lam, mu, rho) -> inner`` and
  ``step(problem, config, u, inner, data, shared, lam, mu, rho, k) -> (u, inner)`` for one image; ``restart``:
  re-``init`` the inner state after each multiplier update (the merit changed). :data:`LM`, :data:`ADAM` and
  :data:`LBFGSB` minimise the augmented Lagrangian; a baseline brings its own rule (e.g. Mahendran-Vedaldi's
  momentum on its prior-regularised objective) and shares the rest of the engine.

  ``score``: optional ``inner -> (u_scored, merit, stop)``, for a rule that evaluates the merit of an iterate as a
  by-product of its step (a fixed-point map): the engine then tracks the best iterate and tests convergence on
  ``u_scored`` (the step's input) instead of evaluating the problem's merit at the new ``u``, and ends the image,
  unconverged, where ``stop`` (the rule gave up: no progress, or divergence)."""

  init: Callable
  step: Callable
  restart: bool = False
  score: Callable | None = None


def _lm_init(problem, config, u, data, shared, lam, mu, rho):
  return lm.init(config.damping, jnp.asarray(rho).dtype)


def _lm_step(problem, config, u, inner, data, shared, lam, mu, rho, k):
  lower, upper = problem.bounds(u, data, shared)
  res_fn = lambda v: al_residual(problem, v, data, shared, lam, mu, rho)
  return lm.step(res_fn, u, lower, upper, inner, config.cg_iters)


def _newton_gmres_step(problem, config, u, inner, data, shared, lam, mu, rho, k):
  lower, upper = problem.bounds(u, data, shared)
  return lm.newton_gmres_step(lambda v: problem.residual(v, data, shared), u, lower, upper, inner, config.cg_iters)


def _adam_init(problem, config, u, data, shared, lam, mu, rho):

  return optax.adam(config.learning_rate).init(u)


def _adam_step(problem, config, u, inner, data, shared, lam, mu, rho, k):

  lower, upper = problem.bounds(u, data, shared)
  g = jax.grad(al_value, argnums=1)(problem, u, data, shared, lam, mu, rho)
  upd, inner = optax.adam(config.learning_rate).update(g, inner, u)
  return tree.tree_map(jnp.clip, optax.apply_updates(u, upd), lower, upper), inner


def _lbfgsb(problem, config, data, shared):
  import jaxopt  # archived, and absent from the accelerator image: imported only for inner='lbfgsb'

  fun = lambda v, lam, mu, rho: al_value(problem, v, data, shared, lam, mu, rho)
  return jaxopt.LBFGSB(fun=fun, maxiter=config.inner_iters, tol=0.0, history_size=10)


def _lbfgsb_init(problem, config, u, data, shared, lam, mu, rho):
  return _lbfgsb(problem, config, data, shared).init_state(u, problem.bounds(u, data, shared), lam, mu, rho)


def _lbfgsb_step(problem, config, u, inner, data, shared, lam, mu, rho, k):
  return _lbfgsb(problem, config, data, shared).update(u, inner, problem.bounds(u, data, shared), lam, mu, rho)


LM = Method(_lm_init, _lm_step)
ADAM = Method(_adam_init, _adam_step, restart=True)
LBFGSB = Method(_lbfgsb_init, _lbfgsb_step, restart=True)
NEWTON_GMRES = Method(_lm_init, _newton_gmres_step)
METHODS = {"lm": LM, "adam": ADAM, "lbfgsb": LBFGSB, "newton_gmres": NEWTON_GMRES}


def default_method(config: SolverConfig, square: bool = False) -> Method:
  """The update rule ``config.inner`` names; ``'newton_gmres'`` needs a square, unconstrained problem (the caller
  vouches for it with ``square``: :mod:`peel_jax.problems.block` does for ``y = x + F(x)`` blocks), else :data:`LM`."""
  if config.inner == "newton_gmres" and not square:
    return LM
  return METHODS[config.inner]


# --- state and one iteration --------------------------------------------------------------------------------------


def _finite(u) -> jax.Array:
  return functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(a)) for a in tree.tree_leaves(u)], jnp.ones((), bool))


def _merit(problem: Problem, u, data, shared):
  if problem.merit is None:  # no merit: no convergence test or best-iterate tracking, the budget is spent
    return jnp.asarray(jnp.inf, tree.tree_leaves(u)[0].dtype)
  return problem.merit(u, data, shared)


def init_state(problem: Problem, method: Method, config: SolverConfig, u0, data, shared) -> State:
  """One image's start state at ``u0``."""
  c, g = constraints(problem, u0, data, shared)
  lam = tree.tree_map(jnp.zeros_like, c)
  mu = tree.tree_map(jnp.zeros_like, g)
  m = _merit(problem, u0, data, shared)
  rho = jnp.asarray(config.rho, m.dtype)
  return State(u=u0, lam=lam, mu=mu, rho=rho, inner=method.init(problem, config, u0, data, shared, lam, mu, rho),
               k=jnp.zeros((), jnp.int32), prev_violation=jnp.asarray(jnp.inf, m.dtype),
               best_u=project(problem, u0, data, shared), best_merit=jnp.where(jnp.isfinite(m), m, jnp.inf),
               merit=m, done=jnp.isfinite(m) & (m <= config.tol), diverged=jnp.zeros((), bool),
               budget=jnp.asarray(config.max_iters, jnp.int32))


def iterate(problem: Problem, method: Method, config: SolverConfig, data, shared, st: State) -> State:
  """One inner step (and, every ``inner_iters`` steps, a multiplier update) for one image; frozen once done."""
  u, inner = method.step(problem, config, st.u, st.inner, data, shared, st.lam, st.mu, st.rho, st.k)
  k = st.k + 1
  outer = (k % config.inner_iters) == 0
  c, g = constraints(problem, u, data, shared)
  lam_new = tree.tree_map(lambda li, ci: li + st.rho * ci, st.lam, c)
  mu_new = tree.tree_map(lambda mi, gi: jnp.maximum(0.0, mi + st.rho * gi), st.mu, g)
  viol = violation(c, g, st.rho.dtype)
  rho_new = jnp.where(viol > 0.25 * st.prev_violation, jnp.minimum(st.rho * config.rho_growth, config.rho_max), st.rho)
  pick = lambda a, b: tree.tree_map(lambda p, q: jnp.where(outer, p, q), a, b)
  lam, mu, rho = pick(lam_new, st.lam), pick(mu_new, st.mu), jnp.where(outer, rho_new, st.rho)
  if method.restart:
    inner = pick(method.init(problem, config, u, data, shared, lam, mu, rho), inner)
  if method.score is None:
    scored, m, stop = u, _merit(problem, u, data, shared), jnp.zeros((), bool)
  else:
    scored, m, stop = method.score(inner)
  finite = (jnp.isfinite(m) | (problem.merit is None)) & _finite(u)
  better = finite & (m < st.best_merit)
  new = State(u=u, lam=lam, mu=mu, rho=rho, inner=inner, k=k, prev_violation=jnp.where(outer, viol, st.prev_violation),
              best_u=tree.tree_map(lambda a, b: jnp.where(better, a, b), project(problem, scored, data, shared),
                                   st.best_u),
              best_merit=jnp.where(better, m, st.best_merit), merit=m,
              done=(finite & (m <= config.tol)) | ~finite | stop, diverged=~finite, budget=st.budget)
  return tree.tree_map(lambda a, b: jnp.where(st.done, a, b), st, new)  # a finished image keeps its state exactly


# --- batched entry points and drivers -----------------------------------------------------------------------------


def bcast(mask, a):
  return mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))


def batch_init(problem, method, config, u0, data, shared) -> State:
  return jax.vmap(lambda uu, dd: init_state(problem, method, config, uu, dd, shared))(u0, data)


def _budgeted_step(problem, method, config, data, shared, st: State) -> State:
  """One iteration for every image; an image that has spent its budget keeps its state."""
  new = jax.vmap(lambda dd, ss: iterate(problem, method, config, dd, shared, ss))(data, st)
  budget = st.k < st.budget
  return tree.tree_map(lambda a, b: jnp.where(bcast(budget, a), a, b), new, st)


@functools.partial(jax.jit, static_argnames=("problem", "method", "config", "steps"))
def iterate_batch(problem, method, config, data, shared, st: State, steps: int = 1) -> State:
  """``steps`` iterations (unrolled) for every image, within the iteration budget."""
  for _ in range(steps):
    st = _budgeted_step(problem, method, config, data, shared, st)
  return st


def run_while(problem, method, config, data, shared, st: State) -> State:
  """Every iteration inside one ``lax.while_loop`` (traceable: use under ``jit``/``scan``)."""
  cond = lambda s: jnp.any(~s.done & (s.k < s.budget))
  return jax.lax.while_loop(cond, lambda s: _budgeted_step(problem, method, config, data, shared, s), st)


solve_while = jax.jit(run_while, static_argnames=("problem", "method", "config"))


def is_traced(*trees) -> bool:
  return any(isinstance(a, jax.core.Tracer) for t in trees for a in tree.tree_leaves(t))


def resolve_driver(config: SolverConfig, *trees) -> str:
  """``'while_loop'`` under tracing or when asked (or ``'auto'`` off CPU); else ``'python'``."""
  if is_traced(*trees):
    return "while_loop"
  if config.driver != "auto":
    return config.driver
  return "python" if jax.default_backend() == "cpu" else "while_loop"


@jax.jit
def _finished(st: State) -> jax.Array:
  # Jitted: the same three operations dispatched eagerly measured 5 ms per check here, against 0.4 ms for a whole
  # fixed-point step of a small block.
  return jnp.all(st.done | (st.k >= st.budget))


def run(problem: Problem, method: Method, config: SolverConfig, data, shared, st: State) -> State:
  """Drives ``st`` until every image is done or has spent its budget."""
  if resolve_driver(config, data, shared, st) == "while_loop":
    return (run_while if is_traced(data, shared, st) else solve_while)(problem, method, config, data, shared, st)
  while not jax.device_get(_finished(st)):
    st = iterate_batch(problem, method, config, data, shared, st, steps=config.steps_per_call)
  return st


_init_jit = jax.jit(batch_init, static_argnames=("problem", "method", "config"))


def solve(problem: Problem, config: SolverConfig, u0, data, shared, method: Method | None = None,
          budget=None) -> State:
  """Solves every image: ``u0`` and ``data`` batched (leading image axis), ``shared`` common.

  Args:
    problem, config: what to solve and how (``config.inner`` picks the method unless ``method`` is given).
    u0: the starts (pytree, leading image axis); data: per-image data; shared: common data.
    method: an update rule (default ``METHODS[config.inner]``).
    budget: iterations per image (an int, traced: changing it does not recompile); default ``config.max_iters``.

  Returns:
    The final :class:`State` (``best_u``, ``best_merit``, ``u``, ``k``, ``done``, ``diverged`` per image).
  """
  method = default_method(config) if method is None else method
  init = batch_init if is_traced(u0, data, shared) else _init_jit
  st = init(problem, method, config, u0, data, shared)
  if budget is not None:
    st = st._replace(budget=jnp.broadcast_to(jnp.asarray(budget, jnp.int32), st.k.shape))
  return run(problem, method, config, data, shared, st)
