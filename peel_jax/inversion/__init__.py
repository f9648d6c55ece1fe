"""The attack: the plan of a backward pass, its drivers, ``invert_network``, its config and its reports.

See ``docs/ARCHITECTURE.md`` for how this package sits between the problems (:mod:`peel_jax.problems`) and the
engine (:mod:`peel_jax.solver.engine`).
"""

from peel_jax.inversion.config import NetworkConfig
from peel_jax.inversion.network import invert_network
from peel_jax.inversion.plan import invertible_layers
from peel_jax.inversion.report import BlockReport, NetworkReport, RefineReport

__all__ = ["NetworkConfig", "invert_network", "invertible_layers", "BlockReport", "NetworkReport", "RefineReport"]
