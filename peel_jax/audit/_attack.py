"""The one place the audit calls the attack and the certificate: :func:`attack`.

Everything else in the audit sees only the per-image arrays it returns, so a stronger attack (or the whole-network
certificate) changes this module and nothing else.

Today's strongest attack (the demo's): :func:`peel_jax.invert_network`, PEEL's block-wise pass with ``max_iters``
LM iterations per block, then ``refine`` iterations of end-to-end LM on the pixels, started per image from the
better (by observation residual, never by the truth) of the block-wise estimate and a Mahendran-Vedaldi estimate
(``refine_start='best'``), with the total-variation prior on the images whose observation does not determine them
by count (``prior='auto'``, :class:`peel_jax.NetworkConfig`). The certificate is the whole network's (:func:`peel_jax.certify_network`, at the
reconstruction): whether the observation determines the image.
"""

from __future__ import annotations

import dataclasses

import numpy as np

REFINE_START = "best"
PRIOR = "auto"


@dataclasses.dataclass(frozen=True)
class Budget:
  """The attack's solver budget: LM iterations per block, CG iterations per LM step, end-to-end refinement
  iterations (0: the block-wise pass alone), and whether to certify (:func:`peel_jax.certify_network`)."""

  max_iters: int = 30
  cg_iters: int = 20
  refine: int = 40
  certify: bool = True

  def network_config(self):
    """The :class:`peel_jax.NetworkConfig` of this budget."""
    from peel_jax import NetworkConfig, SolverConfig

    return NetworkConfig(block=SolverConfig(max_iters=self.max_iters, cg_iters=self.cg_iters),
                         refine_iters=self.refine, refine_start=REFINE_START, prior=PRIOR)

  def describe(self) -> str:
    text = (f"peel_jax.invert_network: PEEL's block-wise pass ({self.max_iters} LM iterations per block, "
            f"{self.cg_iters} CG iterations per step)")
    if self.refine:
      text += (f", then {self.refine} LM iterations end to end on the pixels, started per image from the better (by "
               "observation residual, never by the truth) of the block-wise estimate and a Mahendran-Vedaldi "
               "estimate, towards the exact preimage of least total variation where the counts leave the image "
               "underdetermined")
    return text + ("; whole-network certificate at the reconstruction (peel_jax.certify_network)" if self.certify
                   else "; no certificate")


def attack(model, variables, observed, layer: str, *, key, image, true_features, budget: Budget):
  """Attacks a batch of observations of ``layer``; returns ``(x_hat, per_image)``.

  Args:
    model, variables: the network and its Flax variables.
    observed: what the attacker sees, ``(N, H, W, C)`` (possibly defended).
    layer: the split point.
    key: PRNG key of the attack.
    image: the true normalised images ``(N, S, S, 3)``, to score the reconstruction (the attack never uses them to
      choose anything).
    true_features: ``peel_jax.features`` of ``image`` (per-block input errors).
    budget: :class:`Budget`.

  Returns:
    ``x_hat``: ``(N, S, S, 3)`` normalised reconstructions (NumPy); ``per_image``: a dict of length-``N`` arrays or
    lists: ``psnr``, ``ssim``, ``mse`` (against the truth), ``observation_residual`` (``||f(x_hat) - observed|| /
    ||observed||``), ``blockwise_psnr`` (before the refinement; equal to ``psnr`` without one), ``refine_start``,
    ``blocks_converged`` (every block's solver reached its tolerance), ``certificate`` (the
    :class:`peel_jax.NetworkCertificate` status, or ``'not certified'``) with ``certificate_detail`` (its evidence
    in words), and ``seconds`` (the batch's wall time for attack and certificate, divided evenly).
  """
  import time

  import jax

  import peel_jax

  t0 = time.perf_counter()
  x_hat, rep = peel_jax.invert_network(model, variables, observed, layer, config=budget.network_config(), key=key,
                                       image=image, true_features=true_features)
  n = int(np.shape(rep.psnr)[0])
  status, detail = ["not certified"] * n, [""] * n
  if budget.certify:
    cert = peel_jax.certify_network(model, variables, observed, layer, x_hat, key=jax.random.fold_in(key, 3))
    status, detail = list(cert.status), [_evidence(cert, i) for i in range(n)]
  refined = rep.refine is not None
  per_image = {
      "psnr": np.asarray(rep.psnr, np.float64), "ssim": np.asarray(rep.ssim, np.float64),
      "mse": np.asarray(rep.mse, np.float64),
      "observation_residual": np.asarray(rep.observation_residual, np.float64),
      "blockwise_psnr": np.asarray(rep.refine["blockwise"]["psnr"] if refined else rep.psnr, np.float64),
      "refine_start": list(rep.refine["start"]) if refined else ["none"] * n,
      "blocks_converged": np.all(np.stack([np.asarray(b.converged, bool) for b in rep.blocks]), axis=0),
      "certificate": status, "certificate_detail": detail,
      "seconds": np.full(n, (time.perf_counter() - t0) / n),
  }
  return np.asarray(x_hat), per_image


def _evidence(cert, i: int) -> str:
  """The certificate's evidence for image ``i``, in words."""
  if cert.status[i] == "underdetermined":
    return (f"{int(cert.informative_values[i])} informative observed values for {int(cert.pixels[i])} pixel values: "
            f"a null space of dimension >= {int(cert.null_dim_bound[i])}")
  if cert.status[i] == "not_injective":
    return f"two exact preimages {float(cert.spread[i]):.1e} apart"
  if cert.status[i] == "locally_underdetermined" and int(cert.path_null_dim_bound[i]) > 0:
    return (f"{int(cert.path_informative_values[i])} informative values at {cert.path_layer[i]} for "
            f"{int(cert.pixels[i])} pixel values at the reconstruction: a null space of dimension >= "
            f"{int(cert.path_null_dim_bound[i])}")
  return f"sigma_min / sigma_max <= {float(cert.sigma_ratio[i]):.1e} at the reconstruction"
