"""The augmented-Lagrangian block inverter (see :mod:`peel_jax.solver.core` for the math)."""

from peel_jax.solver.config import SolverConfig
from peel_jax.solver.info import InversionInfo, relative_error, relative_residual

__all__ = ["SolverConfig", "InversionInfo", "relative_error", "relative_residual"]
