"""peel_jax: the PEEL inference-time data leakage attack on residual networks, in JAX.

Reference: Arif, Murugesan, Das, Gittens, Chen, "PEEL the Layers and Find Yourself: Revisiting Inference-time Data
Leakage for Residual Neural Networks", IEEE SaTML 2025, arXiv 2504.06410.
"""

from peel_jax import blocks, models, port
from peel_jax._certify import Certificate, certify_block
from peel_jax._certify_network import NetworkCertificate, certify_network
from peel_jax._features import feature_names, features
from peel_jax._invert_block import invert_block
from peel_jax.inversion import BlockReport, NetworkConfig, NetworkReport, invert_network
from peel_jax.solver import InversionInfo, SolverConfig, relative_error, relative_residual

__version__ = "0.1.0"

__all__ = [
    "blocks", "models", "port", "features", "feature_names", "invert_block", "invert_network", "certify_block",
    "Certificate", "certify_network", "NetworkCertificate", "SolverConfig", "NetworkConfig", "NetworkReport",
    "BlockReport", "InversionInfo", "relative_error", "relative_residual",
]
