"""``invert_network``: from one intermediate output of a ResNet back to the pixels, block by block.

The backward pass (PEEL, arXiv 2504.06410, Sec. 4): the observation is the output of the deepest block; its
recovered input is the observation of the block before it, and so on back through every stage to the stem, whose
inversion gives the image. Every block inversion is :func:`peel_jax.invert_block`; errors compound along the way,
so the report gives, per block, both how far the recovered input is from the truth (when the truth is known) and
how well it reproduces the observation it was given: the two differ wherever a block is not injective (stride-2
blocks, non-contractive branches; see DESIGN.md).

Drivers. Within a stage the blocks after the first are identical in shape and stacked (:class:`peel_jax.blocks.Stage`):

* ``driver='scan'`` inverts them with one ``jax.lax.scan`` (reverse) whose body is
  ``invert_block(..., config=SolverConfig(driver='while_loop'))``: one compiled program per stage, the form for
  accelerators (and for a ``jit`` around the whole backward pass).
* ``driver='loop'`` (the default) inverts block by block from Python, each with the solver's own driver (on CPU
  that drives each jitted step from Python: a convolution inside an XLA loop body, ``scan``/``while_loop``/
  ``fori_loop``, measured about 3x slower there than the same ops driven from Python). Measured here (2-core CPU,
  paper-variant resnet34, 96x96 photo, from ``layer1``: three 48x48x64 blocks, the last two scanned; plain He
  branches so every solve runs its whole budget, ``SolverConfig(max_iters=10, cg_iters=10)``), seconds in the
  residual blocks: loop 4.4 cold / 1.3 warm, scan 4.2 cold / 2.6 warm (resnet18, one scanned block: loop 4.1 / 0.85,
  scan 3.1 / 1.5). The two drivers run the same iterations; their results agree to float32 rounding where the
  solves converge, and drift apart (6% at the third block) where they do not, since rounding differences are
  amplified by unconverged non-injective blocks. Measure again on an accelerator before choosing there.

The stem ``y = pool(act(A0 x))`` (``pool`` in {max 3x3/2 pad 1, avg 3x3/2 pad 1, none}). Without pooling it is
one :func:`invert_block` with the pixel box as bounds, started from mid-grey plus a little noise (at ``x = 0`` a
bias-free stem has a zero Jacobian: every ReLU sits at its kink). With pooling there is no argmax index to use (the
attacker does not have one); the explicit formulation, with ``r = act(A0 x)`` the pre-pool map:

* max pool: every ``r_p`` is at most every pooled output whose window covers ``p``:
  ``r_p <= U_p = min_{w ∋ p} y_w`` (a hard bound, linear in ``x`` for a ReLU: ``A0 x <= U``), and each window
  attains its value: ``max_{p in w} r_p = y_w``, a piecewise-linear equation fitted by least squares;
* avg pool: the linear equation ``avgpool(r) = y``, and (ReLU: ``r >= 0``) ``r_p <= 9 min_{w ∋ p} y_w``;
* the pixel box ``lo <= x <= hi`` (the ImageNet-normalised ``[0, 1]``: ``lo_c = -mean_c / std_c``,
  ``hi_c = (1 - mean_c) / std_c``).

It is solved in two stages (``stem_method='bounded'``, the default): (1) the largest admissible pre-pool map,
``r0 = U`` (max) or the window values spread back (avg), is inverted through the conv + ReLU alone
(:func:`invert_block` on the stem without its pool, pixel box as bounds) for a start ``x0``; (2) from ``x0``,
Levenberg-Marquardt (:mod:`peel_jax.solver.lm`) on ``|| pool(act(A0 x)) - y ||^2`` with the bound
``act(A0 x) <= U`` as an augmented-Lagrangian inequality and the box by projection. Compared on torchvision's
resnet18 at random init (96x96 astronaut, observed at ``maxpool``, one image, default ``SolverConfig``): with max
pooling, :func:`invert_block` on the whole pooled stem (``stem_method='direct'``) stalls at 6.7% residual, 15.2 dB;
stage (1) alone (``'two_stage'``) 15.8 dB; both stages 19.0 dB at 3.0% residual. With avg pooling: direct 22.2 dB,
stage (1) 17.1 dB, both 23.7 dB. Max pooling discards most of the pre-pool map, and no start tried (alternating
projections between the admissible set and the range of the conv included) got much past 19 dB: report the stem's
residual beside the image metrics, never the PSNR alone.

End-to-end refinement (``refine_iters``, off by default): projected LM on ``|| f(x) - observed ||^2`` over the
pixels, ``f`` the network up to the observed layer, from the block-wise estimate. A stride-2 block has fewer outputs
than inputs, so block-wise inversion returns *a* preimage, not the input, and everything before it inherits the
error; the whole map pixels -> layer can still be determined (more observed values than pixels). Measured on the
demo (``peel-jax demo``: paper-variant resnet18, branches scaled by 0.3, 128x128): from ``layer2`` the block-wise
pass gives 11.1 dB, 40 refinement iterations 59.2 dB; from ``layer3`` (65536 observed values for 49152 pixel
values) 5.3 dB block-wise and 9.1 dB refined: determined by count, not reached in 40 iterations; from ``layer4``
(32768 values: underdetermined) 4.1 and 7.0 dB.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from peel_jax import blocks as _blocks
from peel_jax import images as _images
from peel_jax import metrics as _metrics
from peel_jax._certify import certify_block
from peel_jax._features import features
from peel_jax._invert_block import invert_block
from peel_jax.blocks import Block, pool
from peel_jax.solver import lm as _lm
from peel_jax.solver.config import SolverConfig
from peel_jax.solver.info import relative_error, relative_residual

DRIVERS = ("loop", "scan")
STEM_METHODS = ("bounded", "two_stage", "direct")
REFINE_STARTS = ("blockwise", "best")


# --- the report ---------------------------------------------------------------------------------------------------


def _jsonable(v):
  if v is None:
    return None
  if isinstance(v, (list, tuple)):
    return [_jsonable(a) for a in v]
  a = np.asarray(v)
  if a.ndim == 0:
    a = a.item()
    if isinstance(a, float) and not np.isfinite(a):
      return None if np.isnan(a) else (1e308 if a > 0 else -1e308)
    return a
  return [_jsonable(x) for x in a]


def _first(v):
  """One image's value: a batch of one reports scalars."""
  return v[0] if isinstance(v, list) and len(v) == 1 else v


@dataclasses.dataclass
class BlockReport:
  """One block's inversion, per image (arrays with a leading batch axis).

  Attributes:
    name: ``'layer2.1'`` ... or ``'stem'``.
    residual: ``||block(x_hat) - y|| / ||y||`` against the observation the block was given (for every block but the
      deepest, the previous block's estimate).
    input_rel_error: ``||x_hat - x|| / ||x||`` against the true input (``None`` without the truth; for the stem the
      image in normalised units).
    output_rel_error: ``||block(x_hat) - block(x)|| / ||block(x)||`` against the true output (``None`` without it).
    max_violation: largest violation of the architecture's constraints at the solution.
    iterations: solver iterations.
    converged: the solver's per-image flag (``residual <= tol``).
    seconds: wall time of this block (a scanned stage's time is split evenly over its blocks).
    certificate: :class:`peel_jax.Certificate` (``certify=True`` only).
  """

  name: str
  residual: np.ndarray
  input_rel_error: np.ndarray | None
  output_rel_error: np.ndarray | None
  max_violation: np.ndarray
  iterations: np.ndarray
  converged: np.ndarray
  seconds: float
  certificate: Any = None

  @property
  def converged_fraction(self) -> float:
    return float(np.mean(self.converged))

  def to_dict(self) -> dict:
    """JSON-ready; a batch of one gives scalars."""
    out = {
        "name": self.name,
        "input_rel_error": _first(_jsonable(self.input_rel_error)),
        "residual": _first(_jsonable(self.residual)),
        "output_rel_error": _first(_jsonable(self.output_rel_error)),
        "max_violation": _first(_jsonable(self.max_violation)),
        "iterations": _first(_jsonable(self.iterations)),
        "converged": _first(_jsonable(self.converged)),
        "converged_fraction": self.converged_fraction,
        "seconds": self.seconds,
    }
    if self.certificate is not None:
      c = self.certificate
      out["certificate"] = {
          "status": _first(list(c.status)),
          "local_lipschitz": _first(_jsonable(c.local_lipschitz)),
          "global_bound": _jsonable(c.global_bound),
          "spread": _first(_jsonable(c.spread)),
      }
    return out


@dataclasses.dataclass
class NetworkReport:
  """What :func:`invert_network` did and how well, per block (deepest first, the stem last) and for the image.

  Attributes:
    layer: the observed layer.
    blocks: :class:`BlockReport` per inverted block, in inversion order.
    observation_residual: ``||f(x_img) - observed|| / ||observed||`` per image, ``f`` the network up to ``layer``
      and ``x_img`` the recovered image: how well the whole reconstruction explains what was observed.
    mse, psnr, ssim: per image against the original on de-normalised ``[0, 1]`` images (``None`` without it).
    seconds: total wall time.
    driver, stem_method: how it ran.
    estimates: block name -> its recovered input (batched; ``'stem'``: the block-wise image, before any
      refinement), for inspection; not part of :meth:`to_dict`.
    refine: ``None``, or (``refine_iters > 0``) ``{'iterations', 'seconds', 'start', 'blockwise': {...}}`` with the
      start each image's refinement took (``'blockwise'`` or ``'mahendran_vedaldi'``) and the block-wise pass's
      ``observation_residual``, ``mse``, ``psnr``, ``ssim`` before the refinement.
  """

  layer: str
  blocks: list
  observation_residual: np.ndarray
  mse: np.ndarray | None
  psnr: np.ndarray | None
  ssim: np.ndarray | None
  seconds: float
  driver: str
  stem_method: str
  refine: dict | None = None
  estimates: dict = dataclasses.field(default_factory=dict, repr=False)

  def block(self, name: str) -> BlockReport:
    for b in self.blocks:
      if b.name == name:
        return b
    raise KeyError(f"no block {name!r} in this report; blocks: {[b.name for b in self.blocks]}")

  def to_dict(self) -> dict:
    """JSON-ready; a batch of one gives scalars."""
    return {
        "layer": self.layer,
        "psnr": _first(_jsonable(self.psnr)),
        "mse": _first(_jsonable(self.mse)),
        "ssim": _first(_jsonable(self.ssim)),
        "observation_residual": _first(_jsonable(self.observation_residual)),
        "seconds": self.seconds,
        "driver": self.driver,
        "stem_method": self.stem_method,
        "blocks": [b.to_dict() for b in self.blocks],
        "refine": None if self.refine is None else {
            "iterations": self.refine["iterations"], "seconds": self.refine["seconds"],
            "start": _first(self.refine["start"]),
            "blockwise": {k: _first(_jsonable(v)) for k, v in self.refine["blockwise"].items()}},
    }

  def summary(self) -> str:
    """A text table, one line per block."""
    lines = [f"{'block':<12s} {'input err':>10s} {'residual':>10s} {'iters':>6s} {'conv':>5s} {'sec':>7s}"]
    for b in self.blocks:
      err = "-" if b.input_rel_error is None else f"{np.mean(b.input_rel_error):.2e}"
      lines.append(f"{b.name:<12s} {err:>10s} {np.mean(b.residual):10.2e} {int(np.max(b.iterations)):6d} "
                   f"{b.converged_fraction:5.2f} {b.seconds:7.2f}")
    if self.psnr is not None:
      lines.append(f"image: PSNR {np.mean(self.psnr):.2f} dB, SSIM {np.mean(self.ssim):.4f}, "
                   f"MSE {np.mean(self.mse):.3e}")
    if self.refine is not None:
      b = self.refine["blockwise"]
      before = "" if b["psnr"] is None else f", PSNR {np.mean(b['psnr']):.2f} dB"
      lines.append(f"refined end to end ({self.refine['iterations']} iterations) from the block-wise estimate "
                   f"(observation residual {np.mean(b['observation_residual']):.2e}{before})")
    lines.append(f"observation residual {np.mean(self.observation_residual):.2e}, {self.seconds:.1f} s")
    return "\n".join(lines)


# --- planning -----------------------------------------------------------------------------------------------------


def invertible_layers(model) -> list[str]:
  """Names :func:`invert_network` accepts as ``layer``: ``'relu'`` (pre-pool stem), ``'maxpool'``, every
  ``'layerK'`` and ``'layerK.J'``."""
  names = ["relu", "maxpool"]
  for s, n in enumerate(model.stage_sizes):
    names += [f"layer{s + 1}"] + [f"layer{s + 1}.{b}" for b in range(n)]
  return names


def _depth(model, layer: str) -> tuple[int, int]:
  """``(stage, last block index)`` of the deepest block observed at ``layer`` (``(-1, -1)`` for the stem)."""
  if layer in ("relu", "maxpool"):
    return -1, -1
  head, _, tail = layer.partition(".")
  s = int(head[len("layer"):]) - 1
  return s, (int(tail) if tail else model.stage_sizes[s] - 1)


def _input_name(model, stage: int, index: int) -> str:
  """The feature name of the input of block ``layer{stage+1}.{index}``."""
  if index > 0:
    return f"layer{stage + 1}.{index - 1}"
  if stage == 0:
    return "maxpool"
  return f"layer{stage}.{model.stage_sizes[stage - 1] - 1}"


def _full_box(box, shape, dtype):
  """``box`` as two arrays of the input shape of ONE image (per-channel or scalar bounds broadcast)."""
  if box is None:
    return None
  if isinstance(box, str):
    if box != "imagenet":
      raise ValueError(f"unknown box {box!r}; pass 'imagenet', None or (lo, hi)")
    box = _images.pixel_box()
  lo, hi = (jnp.broadcast_to(jnp.asarray(b, dtype), shape) for b in box)
  return lo, hi


# --- the stem -----------------------------------------------------------------------------------------------------


def pool_upper_bound(y: jax.Array, size: tuple[int, int], kind: str) -> jax.Array:
  """Per pre-pool position, the bound from every pooled output whose window covers it (one image).

  For the 3x3 stride-2 pad-1 pool, input row ``i`` is covered by output rows ``i // 2`` and ``(i + 1) // 2``
  (the same row when ``i`` is even). Max pool: ``U_p = min_{w ∋ p} y_w``. Avg pool (non-negative ``r``):
  ``U_p = 9 min_{w ∋ p} y_w``.

  Args:
    y: pooled output ``(Ho, Wo, C)``.
    size: ``(H, W)`` of the pre-pool map.
  """
  ho, wo = y.shape[0], y.shape[1]
  i, j = np.arange(size[0]), np.arange(size[1])
  ia, ib = np.minimum(i // 2, ho - 1), np.minimum((i + 1) // 2, ho - 1)
  ja, jb = np.minimum(j // 2, wo - 1), np.minimum((j + 1) // 2, wo - 1)
  g = lambda a, b: y[a][:, b]
  u = jnp.minimum(jnp.minimum(g(ia, ja), g(ia, jb)), jnp.minimum(g(ib, ja), g(ib, jb)))
  return u if kind == "max" else 9.0 * u


def _spread_back(y: jax.Array, size) -> jax.Array:
  """Each pre-pool position takes the value of the window centred nearest it (one image)."""
  i = np.minimum(np.arange(size[0]) // 2, y.shape[0] - 1)
  j = np.minimum(np.arange(size[1]) // 2, y.shape[1] - 1)
  return y[i][:, j]


def _unpooled(stem: Block) -> Block:
  return Block(stem.params, dataclasses.replace(stem.spec, pool="none", stride=stem.spec.strides[0]))


@functools.partial(jax.jit, static_argnames=("cg_iters", "kind"))
def _stem_lm_step(stem, x, y, ub, mu, rho, st, lo, hi, cg_iters, kind):
  """One projected LM step of the bounded stem problem, vmapped over images."""

  def one(x, y, ub, mu, rho, st):
    s = jnp.maximum(jnp.sqrt(jnp.sum(y * y)), 1e-30)

    def res(x):
      r = stem.act("relu")(stem.affine(0, x[None]))[0]
      e = (pool(r[None], kind)[0] - y) / s
      g = jnp.sqrt(rho) * jax.nn.relu(jnp.where(jnp.isfinite(ub), (r - ub) / s, 0.0) + mu / rho)
      return (e, g)

    return _lm.step(res, x, lo, hi, st, cg_iters)

  return jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0))(x, y, ub, mu, rho, st)


@functools.partial(jax.jit, static_argnames=("kind",))
def _stem_measures(stem, x, y, ub, mu, rho, kind):
  """Per image: true residual, bound violation (scaled), updated multipliers."""

  def one(x, y, ub, mu, rho):
    s = jnp.maximum(jnp.sqrt(jnp.sum(y * y)), 1e-30)
    r = stem.act("relu")(stem.affine(0, x[None]))[0]
    g = jnp.where(jnp.isfinite(ub), (r - ub) / s, 0.0)
    res = jnp.sqrt(jnp.sum((pool(r[None], kind)[0] - y) ** 2)) / s
    return res, jnp.max(jax.nn.relu(g)), jax.nn.relu(mu + rho * g)

  return jax.vmap(one)(x, y, ub, mu, rho)


def _bounded_stem(stem: Block, y, x0, box, config: SolverConfig):
  """Stage (2) of the pooled-stem inversion (see the module docstring); returns ``(best x, iterations)``."""
  kind = stem.spec.pool
  n = y.shape[0]
  size = (2 * y.shape[1], 2 * y.shape[2])
  if kind == "max" or stem.spec.activation == "relu":
    ub = jax.vmap(lambda yy: pool_upper_bound(yy, size, kind))(y)
  else:  # avg pool of a signed activation: no bound
    ub = jnp.full((n, *size, y.shape[-1]), jnp.inf, y.dtype)
  if box is None:
    lo = jnp.full(x0.shape[1:], -jnp.inf, y.dtype)
    hi = jnp.full(x0.shape[1:], jnp.inf, y.dtype)
  else:
    lo, hi = box
  lo_b, hi_b = jnp.broadcast_to(lo, x0.shape), jnp.broadcast_to(hi, x0.shape)
  x = jnp.clip(x0, lo_b, hi_b)
  mu = jnp.zeros(ub.shape, y.dtype)
  rho = jnp.full((n,), config.rho, y.dtype)
  st = jax.vmap(lambda _: _lm.init(config.damping, y.dtype))(jnp.arange(n))
  res, viol, _ = _stem_measures(stem, x, y, ub, mu, rho, kind=kind)
  best_x, best_res = x, np.asarray(res)
  prev_viol = np.full((n,), np.inf)
  k = 0
  while k < config.max_iters and not np.all(best_res <= config.tol):
    x_new, st = _stem_lm_step(stem, x, y, ub, mu, rho, st, lo, hi, cg_iters=config.cg_iters, kind=kind)
    k += 1
    res, viol, mu_new = _stem_measures(stem, x_new, y, ub, mu, rho, kind=kind)
    res, viol = np.asarray(res), np.asarray(viol)
    active = best_res > config.tol  # converged images are frozen
    x = jnp.where(active[:, None, None, None], x_new, x)
    better = active & np.isfinite(res) & (res < best_res)
    best_x = jnp.where(better[:, None, None, None], x, best_x)
    best_res = np.where(better, res, best_res)
    if k % config.inner_iters == 0:
      mu = jnp.where(active[:, None, None, None], mu_new, mu)
      grow = active & (viol > 0.25 * prev_viol)
      rho = jnp.where(grow, jnp.minimum(rho * config.rho_growth, config.rho_max), rho)
      prev_viol = np.where(active, viol, prev_viol)
  return best_x, k


def invert_stem(stem: Block, y, *, key=None, config: SolverConfig | None = None, box=None,
                method: str = "bounded"):
  """Recovers images from the stem output ``y`` ``(N, Ho, Wo, 64)`` (see the module docstring).

  Args:
    stem: the stem block (:func:`peel_jax.blocks.extract` ``(model, variables, 'stem')``).
    y: the stem's output (after its pooling, if any).
    key: PRNG key of the start's noise.
    config: solver options (``max_iters``, ``cg_iters``, ``tol``, penalty settings).
    box: ``(lo, hi)`` arrays of one image's input shape, or ``None``.
    method: for a pooled stem, ``'bounded'`` (both stages), ``'two_stage'`` (stage 1 only) or ``'direct'``
      (:func:`invert_block` on the pooled stem; for comparison).

  Returns:
    ``(x_hat, iterations)``: normalised images ``(N, H, W, 3)`` and iterations spent per image.
  """
  if method not in STEM_METHODS:
    raise ValueError(f"unknown stem method {method!r}; expected one of {STEM_METHODS}")
  config = SolverConfig() if config is None else config
  key = jax.random.key(0) if key is None else key
  k_noise, k_solve = jax.random.split(key)
  n = y.shape[0]
  in_shape = stem.input_shape(y.shape)
  gray = jnp.broadcast_to(jnp.asarray(_images.normalize(np.full(3, 0.5, np.float32))), in_shape)
  x0 = gray + 0.05 * jax.random.normal(k_noise, in_shape, y.dtype)
  if box is not None:
    x0 = jnp.clip(x0, box[0][None], box[1][None])
  if stem.spec.pool == "none" or method == "direct":
    x, info = invert_block(stem, y, x0=x0, key=k_solve, config=config, box=box)
    return x, np.asarray(info.iterations)
  size = (2 * y.shape[1], 2 * y.shape[2])
  if stem.spec.pool == "max":
    r0 = jax.vmap(lambda yy: pool_upper_bound(yy, size, "max"))(y)
  else:
    r0 = jax.vmap(lambda yy: _spread_back(yy, size))(y)
  x1, info = invert_block(_unpooled(stem), r0, x0=x0, key=k_solve, config=config, box=box)
  its = np.asarray(info.iterations)
  if method == "two_stage":
    return x1, its
  x2, k = _bounded_stem(stem, y, x1, box, config)
  return x2, its + k


# --- end-to-end refinement -----------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "layer", "cg_iters"))
def _refine_step(model, variables, layer, x, y, st, lo, hi, cg_iters):
  def one(x, y, st):
    s = jnp.maximum(jnp.sqrt(jnp.sum(y * y)), 1e-30)
    res = lambda t: (features(model, variables, t[None], layer)[layer][0] - y) / s
    return _lm.step(res, x, lo, hi, st, cg_iters)

  return jax.vmap(one)(x, y, st)


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def _observation_residual(model, variables, layer, x, y):
  return relative_error(features(model, variables, x, layer)[layer], y)


def refine_image(model, variables, layer, observed, x, *, box=None, config: SolverConfig | None = None,
                 iters: int = 20):
  """Projected Levenberg-Marquardt on ``|| f(x) - observed ||^2`` over the pixels, from ``x`` (``f``: the network
  up to ``layer``; the pixel ``box`` by projection). Per image; converged images are frozen.

  Returns ``(x, iterations)``: the best iterate by observation residual and the iterations spent.
  """
  config = SolverConfig() if config is None else config
  n = x.shape[0]
  if box is None:
    lo = jnp.full(x.shape[1:], -jnp.inf, x.dtype)
    hi = jnp.full(x.shape[1:], jnp.inf, x.dtype)
  else:
    lo, hi = box
  st = jax.vmap(lambda _: _lm.init(config.damping, x.dtype))(jnp.arange(n))
  best_x = x
  best_res = np.asarray(_observation_residual(model, variables, layer, x, observed))
  k = 0
  while k < iters and not np.all(best_res <= config.tol):
    x_new, st = _refine_step(model, variables, layer, x, observed, st, lo, hi, cg_iters=config.cg_iters)
    k += 1
    active = best_res > config.tol
    x = jnp.where(active[:, None, None, None], x_new, x)
    res = np.asarray(_observation_residual(model, variables, layer, x, observed))
    better = active & np.isfinite(res) & (res < best_res)
    best_x = jnp.where(better[:, None, None, None], x, best_x)
    best_res = np.where(better, res, best_res)
  return best_x, k


# --- residual blocks ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def _scan_invert(stacked: Block, y, keys, config: SolverConfig):
  """Inverts the stacked identical blocks ``stacked`` (forward order along axis 0), deepest first, in one scan.

  Returns ``(x_first, xs, infos)``: the input of the first stacked block, the estimated input of every stacked block
  (``xs[i]`` for block ``i``) and their infos.
  """
  spec = stacked.spec

  def step(carry, inp):
    p, k = inp
    x, inf = invert_block(Block(p, spec), carry, key=k, config=config)
    return x, (x, inf)

  x, (xs, infs) = jax.lax.scan(step, y, (stacked.params, keys), reverse=True)
  return x, xs, infs


class _Progress:
  def __init__(self, progress, total: int):
    self.fn = progress if callable(progress) else None
    self.bar = None
    self.total, self.done = total, 0
    if progress is True:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, desc="invert", unit="block", file=sys.stderr, leave=False)

  def update(self, name: str, count: int = 1):
    self.done += count
    if self.bar is not None:
      self.bar.set_postfix_str(name)
      self.bar.update(count)
    if self.fn is not None:
      self.fn(name, self.done, self.total)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _per_image(a) -> np.ndarray:
  return np.asarray(jax.device_get(a))


def invert_network(
    model,
    variables,
    observed: jax.Array,
    layer: str,
    *,
    key: jax.Array | None = None,
    config: SolverConfig | None = None,
    stem_config: SolverConfig | None = None,
    true_features: dict | None = None,
    image: jax.Array | None = None,
    box: Any = "imagenet",
    driver: str = "loop",
    progress: bool | Callable[[str, int, int], None] | None = None,
    certify: bool = False,
    certify_starts: int = 0,
    stem_method: str = "bounded",
    refine_iters: int = 0,
    refine_start: str = "blockwise",
    block_solver: Callable | None = None,
) -> tuple[jax.Array, NetworkReport]:
  """Recovers the input images of ``model`` from the output of ``layer``, block by block, deepest first.

  Args:
    model: a :class:`peel_jax.models.ResNet`.
    variables: its Flax variables.
    observed: the output of ``layer`` for a batch, ``(N, H, W, C)`` (one image ``(H, W, C)`` is accepted).
    layer: one of :func:`invertible_layers`: ``'layer3'``, ``'layer2.1'``, ``'maxpool'`` (the stem output),
      ``'relu'`` (the stem before its pooling) ...
    key: PRNG key (random starts, the stem start's noise).
    config: :class:`SolverConfig` of every residual block (default ``SolverConfig()``).
    stem_config: :class:`SolverConfig` of the stem (default ``config``).
    true_features: ``peel_jax.features(model, variables, image)`` (or the needed subset), to report each block's
      input error. Computed from ``image`` when only the image is given.
    image: the original normalised images ``(N, H, W, 3)``, for input errors and MSE/PSNR/SSIM.
    box: bounds on the pixels: ``'imagenet'`` (the ImageNet-normalised ``[0, 1]`` range, per channel), ``None``, or
      ``(lo, hi)`` (scalars or per-channel arrays in normalised units).
    driver: ``'loop'`` (blocks driven from Python; fastest on CPU) or ``'scan'`` (one ``lax.scan`` per stage over
      its stacked identical blocks, with ``while_loop`` solvers inside). See the module docstring.
    progress: ``True`` for a tqdm bar on stderr, or a callable ``(block_name, done, total)``.
    certify: also run :func:`peel_jax.certify_block` per residual block (determinacy evidence in the report).
    certify_starts: extra starts per block for the certificate's multistart test (0: Lipschitz estimates only).
    stem_method: how a pooled stem is inverted (see :func:`invert_stem`).
    refine_iters: after the block-wise pass, this many iterations of :func:`refine_image` (projected LM on the
      whole map pixels -> ``layer``, from the block-wise estimate, with ``stem_config``'s CG budget). 0 (default):
      the paper's block-wise attack alone. The report then gives the block-wise figures under ``refine``.
    refine_start: where the refinement starts, per image: ``'blockwise'`` (the block-wise estimate) or ``'best'``:
      whichever of the block-wise estimate and a Mahendran-Vedaldi estimate
      (:func:`peel_jax.baselines.mahendran_vedaldi`, default settings: its total-variation prior only picks the
      start, the refinement itself has none) reproduces the observation better. The choice looks at the observation
      only, never at the truth; the report says which start each image took (``refine['start']``).
    block_solver: replaces :func:`invert_block` for every residual block (and for an unpooled stem), to run
      another block solver through the same backward pass and report: a callable ``(block, y, *, key) ->
      (x_hat, info)`` with ``info`` carrying per-image ``residual``, ``max_violation``, ``iterations`` and
      ``converged`` (e.g. ``functools.partial(peel_jax.baselines.authors_penalty, steps=1000)``). It needs
      ``driver='loop'``. A pooled stem is still inverted by :func:`invert_stem` (the baselines have no pooled-stem
      formulation). Default: :func:`invert_block` with ``config``.

  Returns:
    ``(images, report)``: the recovered normalised images ``(N, H, W, 3)`` (unbatched if ``observed`` was) and a
    :class:`NetworkReport`.

  Raises:
    KeyError: an unknown ``layer`` (the message lists the valid names).
    ValueError: a bad driver, stem method, box, or an observation that does not fit ``layer``.
  """
  t_start = time.perf_counter()
  valid = invertible_layers(model)
  if layer not in valid:
    raise KeyError(f"cannot invert from layer {layer!r}; valid layers: {', '.join(valid)}")
  if driver not in DRIVERS:
    raise ValueError(f"unknown driver {driver!r}; expected one of {DRIVERS}")
  if block_solver is not None and driver != "loop":
    raise ValueError("a custom block_solver needs driver='loop' (the scan driver runs invert_block itself)")
  if stem_method not in STEM_METHODS:
    raise ValueError(f"unknown stem method {stem_method!r}; expected one of {STEM_METHODS}")
  if refine_start not in REFINE_STARTS:
    raise ValueError(f"unknown refine_start {refine_start!r}; expected one of {REFINE_STARTS}")
  config = (SolverConfig() if config is None else config).validate()
  stem_config = (config if stem_config is None else stem_config).validate()
  key = jax.random.key(0) if key is None else key
  observed = jnp.asarray(observed)
  batched = observed.ndim == 4
  if not batched:
    observed = observed[None]
  if image is not None:
    image = jnp.asarray(image)
    if image.ndim == 3:
      image = image[None]
    if true_features is None:
      true_features = features(model, variables, image)
  truth = dict(true_features or {})
  if image is not None:
    truth["__image__"] = image

  stage, last = _depth(model, layer)
  stem = _blocks.stem_block(model, variables)
  if layer == "relu":
    stem = _unpooled(stem)
  units = []  # inversion order: ('block', Block) or ('scan', stacked Block, stage, first index, last index)
  for s in range(stage, -1, -1):
    top = last if s == stage else model.stage_sizes[s] - 1
    st = _blocks.stage_blocks(model, variables, s)
    if driver == "scan" and top >= 1:
      rest = st.rest.with_params(jax.tree.map(lambda a: a[:top], st.rest.params))
      units.append(("scan", rest, s, 1, top))
    else:
      # The stacked spec's name for every rest block: one compiled solver serves the whole stage.
      units += [("block", Block(_blocks.residual_block(model, variables, s, b).params, st.rest.spec), b)
                for b in range(top, 0, -1)]
    units.append(("block", st.first, 0))
  total = sum(u[4] if u[0] == "scan" else 1 for u in units) + 1
  bar = _Progress(progress, total)
  reports, estimates = [], {}
  y = observed
  scan_config = dataclasses.replace(config, driver="while_loop")

  def key_of(s: int, b: int):  # the same key for a block whichever the driver
    return jax.random.fold_in(key, 1 + sum(model.stage_sizes[:s]) + b)

  def block_report(blk: Block, name: str, x_hat, y_obs, info, seconds, in_name: str | None, out_name: str | None,
                   certify_this: bool = True):
    x_true = truth.get(in_name) if in_name else None
    y_true = truth.get(out_name) if out_name else None
    err = None if x_true is None else _per_image(relative_error(x_hat, jnp.asarray(x_true)))
    out_err = None if y_true is None else _per_image(relative_residual(blk, x_hat, jnp.asarray(y_true)))
    cert = None
    if certify and certify_this:
      cert = certify_block(blk, x_hat, y_obs, key=jax.random.fold_in(key, len(reports)), starts=certify_starts,
                           solver_kwargs={"config": config})
    return BlockReport(name=name, residual=_per_image(info.residual), input_rel_error=err,
                       output_rel_error=out_err, max_violation=_per_image(info.max_violation),
                       iterations=_per_image(info.iterations), converged=_per_image(info.converged),
                       seconds=seconds, certificate=cert)

  try:
    for unit in units:
      if unit[0] == "block":
        blk, b = unit[1], unit[2]
        s = int(blk.spec.name.partition(".")[0][len("layer"):]) - 1
        name = f"layer{s + 1}.{b}"
        t0 = time.perf_counter()
        if block_solver is None:
          x_hat, info = invert_block(blk, y, key=key_of(s, b), config=config)
        else:
          x_hat, info = block_solver(blk, y, key=key_of(s, b))
        x_hat = jax.block_until_ready(x_hat)
        dt = time.perf_counter() - t0
        reports.append(block_report(blk, name, x_hat, y, info, dt, _input_name(model, s, b), name))
        estimates[name] = x_hat
        bar.update(name)
        y = x_hat
      else:
        _, stacked, s, first, top = unit
        keys = jnp.stack([key_of(s, b) for b in range(first, top + 1)])
        t0 = time.perf_counter()
        x_hat, xs, infos = _scan_invert(stacked, y, keys, scan_config)
        x_hat = jax.block_until_ready(x_hat)
        dt = (time.perf_counter() - t0) / (top - first + 1)
        ys = [xs[i + 1] for i in range(top - first)] + [y]  # observation of stacked block i
        for i in range(top - first, -1, -1):
          b = first + i
          name = f"layer{s + 1}.{b}"
          blk = stacked.with_params(jax.tree.map(lambda a, i=i: a[i], stacked.params))
          blk = Block(blk.params, dataclasses.replace(blk.spec, name=name))
          info = jax.tree.map(lambda a, i=i: a[i], infos)
          reports.append(block_report(blk, name, xs[i], ys[i], info, dt, _input_name(model, s, b), name))
          estimates[name] = xs[i]
        bar.update(f"layer{s + 1}.{first}:{top + 1}", top - first + 1)
        y = x_hat

    # The stem.
    box_full = _full_box(box, stem.input_shape(y.shape)[1:], y.dtype)
    t0 = time.perf_counter()
    if block_solver is not None and stem.spec.pool == "none":
      x_img, stem_info = block_solver(stem, y, key=jax.random.fold_in(key, 0))
      its = _per_image(stem_info.iterations)
    else:
      x_img, its = invert_stem(stem, y, key=jax.random.fold_in(key, 0), config=stem_config, box=box_full,
                               method=stem_method)
    x_img = jax.block_until_ready(x_img)
    dt = time.perf_counter() - t0
    res = _per_image(relative_residual(stem, x_img, y))
    viol = np.zeros(res.shape, np.float32)
    if box_full is not None:
      over = jnp.maximum(box_full[0][None] - x_img, x_img - box_full[1][None])
      viol = _per_image(jnp.maximum(jnp.max(over.reshape(x_img.shape[0], -1), axis=1), 0.0))
    info = types.SimpleNamespace(residual=res, max_violation=viol, iterations=its,
                                 converged=np.isfinite(res) & (res <= stem_config.tol * 1.0001))
    stem_out = "relu" if layer == "relu" else "maxpool"
    reports.append(block_report(stem, "stem", x_img, y, info, dt, "__image__", stem_out, certify_this=False))
    estimates["stem"] = x_img
    bar.update("stem")
  finally:
    bar.close()

  def image_figures(x):
    obs_res = _per_image(_observation_residual(model, variables, layer, x, observed))
    if image is None:
      return obs_res, None, None, None
    m = _metrics.image_metrics(_images.denormalize(x), _images.denormalize(image))
    return obs_res, m["mse"], m["psnr"], m["ssim"]

  obs_res, mse, psnr, ssim = image_figures(x_img)
  refine = None
  if refine_iters > 0:
    t0 = time.perf_counter()
    from_prior = np.zeros(obs_res.shape, bool)
    if refine_start == "best":
      from peel_jax.baselines.mahendran_vedaldi import mahendran_vedaldi  # (it imports this module)

      x_mv, _ = mahendran_vedaldi(model, variables, observed, layer, key=jax.random.fold_in(key, 2**31 - 1),
                                box=box)
      from_prior = _per_image(_observation_residual(model, variables, layer, x_mv, observed)) < obs_res
      x_img = jnp.where(from_prior[:, None, None, None], x_mv, x_img)
    x_img, k = refine_image(model, variables, layer, observed, x_img, box=box_full, config=stem_config,
                            iters=refine_iters)
    refine = {"iterations": k, "seconds": time.perf_counter() - t0,
              "start": ["mahendran_vedaldi" if f else "blockwise" for f in from_prior], "blockwise": {
                  "observation_residual": obs_res, "mse": mse, "psnr": psnr, "ssim": ssim}}
    obs_res, mse, psnr, ssim = image_figures(x_img)
  report = NetworkReport(layer=layer, blocks=reports, observation_residual=obs_res, mse=mse, psnr=psnr, ssim=ssim,
                         seconds=time.perf_counter() - t_start, driver=driver,
                         stem_method="none" if stem.spec.pool == "none" else stem_method, refine=refine,
                         estimates=estimates)
  if not batched:
    x_img = x_img[0]
  return x_img, report
