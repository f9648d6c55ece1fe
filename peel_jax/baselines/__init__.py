"""Baselines the PEEL solver is measured against."""

from peel_jax.baselines.authors import authors_penalty
from peel_jax.baselines.fixed_point import fixed_point
from peel_jax.baselines.mahendran_vedaldi import MVInfo, mahendran_vedaldi

__all__ = ["authors_penalty", "fixed_point", "mahendran_vedaldi", "MVInfo"]
