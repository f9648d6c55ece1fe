"""The reports of a backward pass: ``BlockReport`` per inverted unit and ``NetworkReport`` for the whole pass.

Both are pytrees (``flax.struct``): per-image arrays are leaves, names and options are static metadata, so a jitted
:func:`peel_jax.invert_network` returns them. ``to_dict`` (JSON) and ``summary`` (text) convert to numpy and run
outside ``jit``. Wall-clock ``seconds`` can only be measured eagerly: under tracing they are NaN.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np

static = lambda **kw: flax.struct.field(pytree_node=False, **kw)


def jsonable(v):
  """``v`` (array, scalar, sequence or None) as plain Python, non-finite floats as None / +-1e308."""
  if v is None:
    return None
  if isinstance(v, (list, tuple)):
    return [jsonable(a) for a in v]
  a = np.asarray(v)
  if a.ndim == 0:
    a = a.item()
    if isinstance(a, float) and not np.isfinite(a):
      return None if np.isnan(a) else (1e308 if a > 0 else -1e308)
    return a
  return [jsonable(x) for x in a]


def first(v):
  """One image's value: a batch of one reports scalars."""
  return v[0] if isinstance(v, list) and len(v) == 1 else v


def _seconds(v) -> float:
  return float(np.asarray(v))


@flax.struct.dataclass
class BlockReport:
  """One block's inversion, per image (arrays with a leading batch axis).

  Attributes:
    name: ``'layer2.1'`` ... or ``'stem'`` (static).
    residual: ``||block(x_hat) - y|| / ||y||`` against the observation the block was given.
    input_rel_error: ``||x_hat - x|| / ||x||`` against the true input (``None`` without the truth).
    output_rel_error: ``||block(x_hat) - block(x)|| / ||block(x)||`` against the true output (``None`` without it).
    max_violation: largest violation of the architecture's constraints at the solution.
    iterations: solver iterations.
    converged: the solver's per-image flag (``residual <= tol``).
    seconds: wall time of this block (a scanned stage's time split evenly over its blocks; NaN under ``jit``;
      static).
    certificate: :class:`peel_jax.Certificate` (``certify=True`` only; static).
  """

  residual: Any
  input_rel_error: Any
  output_rel_error: Any
  max_violation: Any
  iterations: Any
  converged: Any
  name: str = static()
  seconds: float = static(default=float("nan"))
  certificate: Any = static(default=None)

  @property
  def converged_fraction(self) -> float:
    return float(np.mean(np.asarray(self.converged)))

  def to_dict(self) -> dict:
    """JSON-ready; a batch of one gives scalars."""
    out = {"name": self.name}
    for k in ("input_rel_error", "residual", "output_rel_error", "max_violation", "iterations", "converged"):
      out[k] = first(jsonable(getattr(self, k)))
    out["converged_fraction"] = self.converged_fraction
    out["seconds"] = jsonable(_seconds(self.seconds))
    if self.certificate is not None:
      c = self.certificate
      out["certificate"] = {"status": first(list(c.status)), "local_lipschitz": first(jsonable(c.local_lipschitz)),
                            "global_bound": jsonable(c.global_bound), "spread": first(jsonable(c.spread))}
    return out


@flax.struct.dataclass
class RefineReport:
  """The end-to-end refinement: ``iterations`` per image, ``seconds``, ``from_prior`` (per image: the start was the
  Mahendran-Vedaldi estimate), ``with_prior`` (per image: the refinement minimised the total-variation prior over
  the exact preimages) and ``blockwise``: the block-wise pass's ``observation_residual``, ``mse``, ``psnr``,
  ``ssim`` before it. ``report.refine['start']`` etc. also work (dict-style access)."""

  iterations: Any
  from_prior: Any
  with_prior: Any
  blockwise: dict
  seconds: float = static(default=float("nan"))

  @property
  def start(self) -> list[str]:
    return ["mahendran_vedaldi" if f else "blockwise" for f in np.asarray(self.from_prior)]

  def __getitem__(self, key: str):
    return getattr(self, key)

  def to_dict(self) -> dict:
    return {"iterations": int(np.max(np.asarray(self.iterations))), "seconds": jsonable(_seconds(self.seconds)),
            "start": first(self.start), "with_prior": first(jsonable(self.with_prior)), "blockwise": {k: first(jsonable(v)) for k, v in self.blockwise.items()}}


@flax.struct.dataclass
class NetworkReport:
  """What :func:`peel_jax.invert_network` did and how well, per block (deepest first, the stem last) and per image.

  Attributes:
    blocks: :class:`BlockReport` per inverted block, in inversion order.
    observation_residual: ``||f(x_img) - observed|| / ||observed||`` per image (``f``: the network up to ``layer``).
    informative_values, null_dim_bound: per image, the observed values that are equations and the lower bound
      ``max(0, pixel values - informative_values)`` on the dimension of the Jacobian's null space at every exact
      preimage (the counts of :func:`peel_jax.certify_network`; a positive bound: the observation does not
      determine the image).
    mse, psnr, ssim: per image against the original on de-normalised ``[0, 1]`` images (``None`` without it).
    seconds: total wall time (NaN under ``jit``).
    refine: ``None`` or a :class:`RefineReport`.
    estimates: block name -> its recovered input (``'stem'``: the block-wise image), not part of :meth:`to_dict`.
    layer, driver, stem_method, seconds: static.
  """

  blocks: list
  observation_residual: Any
  informative_values: Any
  null_dim_bound: Any
  mse: Any
  psnr: Any
  ssim: Any
  refine: Any
  estimates: dict
  layer: str = static()
  driver: str = static()
  stem_method: str = static()
  seconds: float = static(default=float("nan"))

  def block(self, name: str) -> BlockReport:
    for b in self.blocks:
      if b.name == name:
        return b
    raise KeyError(f"no block {name!r} in this report; blocks: {[b.name for b in self.blocks]}")

  def to_dict(self) -> dict:
    """JSON-ready (numpy, outside ``jit``); a batch of one gives scalars."""
    out = {"layer": self.layer}
    for k in ("psnr", "mse", "ssim", "observation_residual", "informative_values", "null_dim_bound"):
      out[k] = first(jsonable(getattr(self, k)))
    out.update(seconds=jsonable(_seconds(self.seconds)), driver=self.driver, stem_method=self.stem_method,
               blocks=[b.to_dict() for b in self.blocks], refine=None if self.refine is None else self.refine.to_dict())
    return out

  def summary(self) -> str:
    """A text table, one line per block."""
    lines = [f"{'block':<12s} {'input err':>10s} {'residual':>10s} {'iters':>6s} {'conv':>5s} {'sec':>7s}"]
    for b in self.blocks:
      err = "-" if b.input_rel_error is None else f"{np.mean(b.input_rel_error):.2e}"
      lines.append(f"{b.name:<12s} {err:>10s} {np.mean(b.residual):10.2e} {int(np.max(b.iterations)):6d} "
                   f"{b.converged_fraction:5.2f} {_seconds(b.seconds):7.2f}")
    if self.psnr is not None:
      lines.append(f"image: PSNR {np.mean(self.psnr):.2f} dB, SSIM {np.mean(self.ssim):.4f}, "
                   f"MSE {np.mean(self.mse):.3e}")
    if self.refine is not None:
      b = self.refine.blockwise
      before = "" if b["psnr"] is None else f", PSNR {np.mean(b['psnr']):.2f} dB"
      prior = int(np.sum(np.asarray(self.refine.with_prior)))
      lines.append(f"refined end to end ({int(np.max(self.refine.iterations))} iterations, the TV prior on {prior} "
                   f"of {np.size(self.refine.with_prior)} images) from the block-wise estimate (observation residual "
                   f"{np.mean(b['observation_residual']):.2e}{before})")
    bounds = np.asarray(self.null_dim_bound)
    under = "" if not np.any(bounds > 0) else f" (null-space dimension >= {int(np.min(bounds[bounds > 0]))})"
    lines.append(f"observation residual {np.mean(self.observation_residual):.2e}, {_seconds(self.seconds):.1f} s; "
                 f"by count the observation leaves {int(np.sum(bounds > 0))} of {bounds.size} images "
                 f"underdetermined{under}")
    return "\n".join(lines)

  def to_numpy(self) -> "NetworkReport":
    """The same report with every leaf as a numpy array (e.g. after a jitted call)."""
    return jax.tree.map(np.asarray, self)
