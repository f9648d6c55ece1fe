"""Compatibility names: the backward pass now lives in :mod:`peel_jax.inversion` (plan, drivers, network, report)
and :mod:`peel_jax.problems` (stem, refinement). Import from there in new code."""

from peel_jax.inversion.config import DRIVERS, REFINE_STARTS, STEM_METHODS, NetworkConfig
from peel_jax.inversion.network import invert_network
from peel_jax.inversion.plan import invertible_layers
from peel_jax.inversion.report import BlockReport, NetworkReport
from peel_jax.problems.refine import refine_image
from peel_jax.problems.stem import invert_stem, pool_upper_bound

__all__ = ["DRIVERS", "REFINE_STARTS", "STEM_METHODS", "NetworkConfig", "invert_network", "invertible_layers",
           "BlockReport", "NetworkReport", "refine_image", "invert_stem", "pool_upper_bound"]
