"""The solver engine (:mod:`peel_jax.solver.engine`): batched augmented Lagrangian, inner methods, drivers.

It knows nothing of ResNets; :mod:`peel_jax.problems` defines what it solves."""

from peel_jax.solver.config import SolverConfig
from peel_jax.solver.info import InversionInfo, relative_error, relative_residual

__all__ = ["SolverConfig", "InversionInfo", "relative_error", "relative_residual"]
