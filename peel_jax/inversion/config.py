"""``NetworkConfig``: every option of :func:`peel_jax.invert_network`, one frozen, hashable dataclass."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from peel_jax.solver.config import SolverConfig

DRIVERS = ("loop", "scan")
STEM_METHODS = ("bounded", "two_stage", "direct")
REFINE_STARTS = ("blockwise", "best")
PRIORS = (None, "tv", "auto")
PRIOR_RHO = 10.0
POOL_CHOICE_RHO = 100.0
PAST_POOL_RHO = 0.1


def _hashable_box(box):
  if box is None or isinstance(box, str):
    return box
  return tuple(tuple(float(v) for v in np.ravel(b)) if np.ndim(b) else float(b) for b in box)


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
  """Options of :func:`peel_jax.invert_network` (a ``jit`` static argument: frozen and hashable).

  The defaults are the strongest attack measured (``benchmarks/RESULTS.md``): the paper's block-wise pass, then
  ``refine_iters`` iterations towards an exact preimage from the better (by observation residual) of the block-wise
  and a Mahendran-Vedaldi estimate, with the total-variation prior on the images whose observation does not
  determine them by count (``prior='auto'``). :meth:`blockwise` is the paper's attack alone.

  Attributes:
    block: :class:`SolverConfig` of every residual block.
    stem: :class:`SolverConfig` of the stem and of the refinement (``None``: ``block``).
    driver: ``'loop'`` (blocks one by one from Python, each with its solver's own driver; the CPU default) or
      ``'scan'`` (each stage's identical blocks in one ``lax.scan``, every solve in a ``while_loop``: the whole pass
      is then one traceable program, ``jax.jit`` it for accelerators).
    stem_method: how a pooled stem is inverted: ``'bounded'`` (both stages), ``'two_stage'`` (stage 1 only),
      ``'direct'`` (:func:`peel_jax.invert_block` on the pooled stem). See :mod:`peel_jax.problems.stem`.
    refine_iters: iterations of end-to-end refinement after the block-wise pass (0: the paper's attack alone).
    refine_start: ``'blockwise'`` or ``'best'`` (per image, whichever of the block-wise and a Mahendran-Vedaldi
      estimate reproduces the observation better; the choice never sees the truth). The estimate is computed only
      when some image's block-wise estimate misses the refinement's tolerance (``stem``'s ``tol``).
    mv_steps, mv_lambda_tv: the Mahendran-Vedaldi estimate of ``refine_start='best'``: its steps and its
      total-variation weight (:func:`peel_jax.baselines.mahendran_vedaldi`).
    certify: run :func:`peel_jax.certify_block` per residual block (eager only).
    certify_starts: extra starts per block for the certificate's multistart test.
    box: pixel bounds: ``'imagenet'``, ``None``, or ``(lo, hi)`` (scalars or per-channel sequences; stored as
      tuples of floats).
    block_solver: replaces :func:`peel_jax.invert_block` for every residual block (and an unpooled stem): a
      callable ``(block, y, *, key) -> (x_hat, info)``; needs ``driver='loop'``.
    prior: ``None`` (the refinement fits the observation alone), ``'tv'``: the refinement solves
      ``min R_tv(x) s.t. f(x) = observed`` (:mod:`peel_jax.problems.preimage`), the smoothest exact preimage, a
      data-free choice among the images that reproduce the observation (needs ``refine_iters > 0``); or ``'auto'``:
      ``'tv'`` on the images that a count says are not determined: fewer informative observed values than pixel
      values, or, at the refinement's start, fewer informative values than pixel values at some gated layer on the
      way to ``layer`` (a max-pool's distinct maxima, a ReLU's or an earlier block's non-zero values:
      :func:`peel_jax.certify_network`'s path count); no prior on the others (when no image of the batch needs
      it, exactly the ``None`` refinement).
    prior_weight: ``lambda_tv`` of the ``'tv'`` prior, in the Mahendran-Vedaldi baseline's units (> 0).
    prior_rho: the augmented-Lagrangian penalty of the prior's refinement; ``None`` chooses by where ``layer`` is
      (never by the image): :data:`POOL_CHOICE_RHO` where the window maxima are chosen (a max-pooled stem's
      output: an exact preimage is reached sooner), :data:`PAST_POOL_RHO` past a max-pool (where the equality
      through the pool stalls short of an exact preimage, a softer penalty lets the prior steer: a higher PSNR at
      the same observation residual), :data:`PRIOR_RHO` elsewhere. Measurements: ``benchmarks/RESULTS.md``.
  """

  block: SolverConfig = SolverConfig()
  stem: SolverConfig | None = None
  driver: str = "loop"
  stem_method: str = "bounded"
  refine_iters: int = 200
  refine_start: str = "best"
  mv_steps: int = 400
  mv_lambda_tv: float = 1e-3
  certify: bool = False
  certify_starts: int = 0
  box: Any = "imagenet"
  block_solver: Callable | None = None
  prior: str | None = "auto"
  prior_weight: float = 1e-3
  prior_rho: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "box", _hashable_box(self.box))

  @classmethod
  def blockwise(cls, **changes) -> "NetworkConfig":
    """The paper's attack alone: the block-wise pass, no refinement (``changes`` set other fields)."""
    return cls(**{"refine_iters": 0, "refine_start": "blockwise", "prior": None, **changes})

  @property
  def stem_config(self) -> SolverConfig:
    return self.block if self.stem is None else self.stem

  def validate(self) -> "NetworkConfig":
    """Returns ``self``; raises ``ValueError`` on a bad option."""
    for field, allowed in (("driver", DRIVERS), ("stem_method", STEM_METHODS), ("refine_start", REFINE_STARTS),
                           ("prior", PRIORS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"unknown {field} {getattr(self, field)!r}; expected one of {allowed}")
    if self.block_solver is not None and self.driver != "loop":
      raise ValueError("a custom block_solver needs driver='loop' (the scan driver runs invert_block itself)")
    if self.refine_iters < 0 or self.certify_starts < 0:
      raise ValueError("refine_iters and certify_starts must be >= 0")
    if self.mv_steps < 1 or not self.mv_lambda_tv >= 0:
      raise ValueError(f"mv_steps must be >= 1 and mv_lambda_tv >= 0, got {self.mv_steps!r}, {self.mv_lambda_tv!r}")
    if self.prior == "tv" and self.refine_iters < 1:
      raise ValueError(f"prior={self.prior!r} acts in the refinement: it needs refine_iters >= 1")
    if not (self.prior_weight > 0 and (self.prior_rho is None or self.prior_rho > 0)):
      raise ValueError(f"prior_weight and prior_rho must be > 0, got {self.prior_weight!r}, {self.prior_rho!r}")
    self.block.validate()
    self.stem_config.validate()
    return self
