"""Solver configuration: one frozen, hashable dataclass (a ``jit`` static argument)."""

from __future__ import annotations

import dataclasses

INNERS = ("lm", "adam", "lbfgsb", "newton_gmres")
FORMULATIONS = ("reduced", "lifted")
INITS = ("auto", "observation", "zeros", "random")
DRIVERS = ("auto", "python", "while_loop")
FAST_PATHS = ("auto", "off")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
  """Options of :func:`peel_jax.invert_block`. Defaults were chosen by measurement (benchmarks/RESULTS.md).

  Attributes:
    formulation: ``'reduced'`` eliminates the lifted ``(p, n)`` exactly (``p = relu(u)``, ``n = relu(-u)``) and
      keeps ``x`` plus the architecture's inequalities; ``'lifted'`` solves the paper's problem in ``(x, p, n)``
      with the equality ``u = p - n`` and complementarity ``p * n = 0`` as augmented-Lagrangian constraints.
    inner: the inner minimiser of the augmented Lagrangian: ``'lm'`` (in-house Levenberg-Marquardt: Gauss-Newton
      steps solved matrix-free by CGLS with ``jax.linearize``; exploits that the block is linear given its
      activation pattern), ``'adam'`` (projected optax Adam), ``'lbfgsb'`` (``jaxopt.LBFGSB``) or
      ``'newton_gmres'`` (semi-smooth Newton with GMRES on the square Newton system ``J d = -r`` itself rather than
      CGLS on the normal equations, whose condition number is squared; square blocks only: identity shortcut, no
      post-add activation, reduced formulation; undamped, projected backtracking. Measured against ``'lm'`` in
      ``benchmarks/RESULTS.md``: faster on contractive blocks, stalls at He scale where the bounds are active).
    max_iters: iteration budget per image (inner steps in total).
    inner_iters: inner steps between multiplier updates.
    tol: an image has converged when its relative residual ``||block(x) - y|| / ||y||`` is at most ``tol`` and the
      architecture's bounds hold to ``tol`` (relative to the rms of ``y``).
    cg_iters: Krylov iterations per step (unrolled): CGLS for ``'lm'``, GMRES for ``'newton_gmres'``.
    damping: initial LM damping (relative: residuals are scaled by ``||y||``).
    rho, rho_growth, rho_max: augmented-Lagrangian penalty, its growth when the violation does not fall by 4x.
      Default: no growth (the multipliers alone drive feasibility). Measured here, growing the penalty to 1e6
      ill-conditions the Gauss-Newton system: He-scale BasicBlocks stalled at 2e-3 residual with growth 10 and
      reached 1e-6 without it.
    learning_rate: step size of the ``adam`` inner.
    init: ``'auto'`` (``y`` itself for same-shape blocks, the least-squares preimage of the shortcut for strided or
      projection blocks, zeros for the stem), ``'observation'``, ``'zeros'`` or ``'random'``.
    init_scale: standard deviation of the ``'random'`` start.
    driver: ``'python'`` drives the jitted step from Python; ``'while_loop'`` runs everything inside one
      ``lax.while_loop`` (use inside ``jit``/``scan``); ``'auto'`` picks ``python`` on CPU (a convolution inside an XLA
      loop body measured about 3x slower there: ``python -m benchmarks.loop_overhead``) and ``while_loop`` elsewhere.
    steps_per_call: iterations per jitted call of the Python driver (unrolled).
    fast_path: ``'auto'``: on a block of the form ``y = x + F(x)`` (identity shortcut, no post-add activation,
      stride 1) first run the Anderson-accelerated projected fixed point ``x <- P(y - F(x))``
      (:mod:`peel_jax.solver.anderson`), which gives up on an image whose residual stops halving; every image it
      does not bring to ``tol`` falls back to the augmented Lagrangian, started from its best fixed-point iterate.
      ``'off'``: the augmented Lagrangian only. ``InversionInfo.path`` says per image which path solved it.
    fast_path_iters: fixed-point budget per image.
    anderson_memory: Anderson history length (0: the plain fixed-point iteration).
  """

  formulation: str = "reduced"
  inner: str = "lm"
  max_iters: int = 150
  inner_iters: int = 5
  tol: float = 1e-6
  cg_iters: int = 20
  damping: float = 1e-3
  rho: float = 1.0
  rho_growth: float = 1.0
  rho_max: float = 1e6
  learning_rate: float = 1e-2
  init: str = "auto"
  init_scale: float = 1e-3
  driver: str = "auto"
  steps_per_call: int = 1
  fast_path: str = "auto"
  fast_path_iters: int = 100
  anderson_memory: int = 0

  def validate(self) -> "SolverConfig":
    for field, allowed in (("formulation", FORMULATIONS), ("inner", INNERS), ("init", INITS), ("driver", DRIVERS),
                           ("fast_path", FAST_PATHS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"unknown {field} {getattr(self, field)!r}; expected one of {allowed}")
    for field in ("max_iters", "inner_iters", "cg_iters", "steps_per_call", "fast_path_iters"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
    if self.anderson_memory < 0:
      raise ValueError(f"anderson_memory must be >= 0, got {self.anderson_memory}")
    if not self.tol > 0:
      raise ValueError(f"tol must be > 0, got {self.tol}")
    return self
