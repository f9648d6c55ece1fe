"""Solver configuration: one frozen, hashable dataclass (a ``jit`` static argument)."""

from __future__ import annotations

import dataclasses

INNERS = ("lm", "adam", "lbfgsb")
FORMULATIONS = ("reduced", "lifted")
INITS = ("auto", "observation", "zeros", "random")
DRIVERS = ("auto", "python", "while_loop")


@dataclasses.dataclass(frozen=True)
class SolverConfig:
  """Options of :func:`peel_jax.invert_block`. Defaults were chosen by measurement (benchmarks/RESULTS.md).

  Attributes:
    formulation: ``'reduced'`` eliminates the lifted ``(p, n)`` exactly (``p = relu(u)``, ``n = relu(-u)``) and
      keeps ``x`` plus the architecture's inequalities; ``'lifted'`` solves the paper's problem in ``(x, p, n)``
      with the equality ``u = p - n`` and complementarity ``p * n = 0`` as augmented-Lagrangian constraints.
    inner: the inner minimiser of the augmented Lagrangian: ``'lm'`` (in-house Levenberg-Marquardt: Gauss-Newton
      steps solved matrix-free by CGLS with ``jax.linearize``; exploits that the block is linear given its
      activation pattern), ``'adam'`` (projected optax Adam) or ``'lbfgsb'`` (``jaxopt.LBFGSB``).
    max_iters: iteration budget per image (inner steps in total).
    inner_iters: inner steps between multiplier updates.
    tol: an image has converged when its relative residual ``||block(x) - y|| / ||y||`` is at most ``tol`` and the
      architecture's bounds hold to ``tol`` (relative to the rms of ``y``).
    cg_iters: CGLS iterations per LM step (unrolled).
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

  def validate(self) -> "SolverConfig":
    for field, allowed in (("formulation", FORMULATIONS), ("inner", INNERS), ("init", INITS), ("driver", DRIVERS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"unknown {field} {getattr(self, field)!r}; expected one of {allowed}")
    for field in ("max_iters", "inner_iters", "cg_iters", "steps_per_call"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
    if not self.tol > 0:
      raise ValueError(f"tol must be > 0, got {self.tol}")
    return self
