"""``invert_network``: from one intermediate output of a ResNet back to the pixels, block by block.

The backward pass (PEEL, arXiv 2504.06410, Sec. 4): the observation is the output of the deepest block; its
recovered input is the observation of the block before it, and so on through every stage to the stem, whose
inversion gives the image; optionally an end-to-end refinement follows. Data flows one way: observation ->
:mod:`~peel_jax.inversion.plan` -> :mod:`peel_jax.problems` -> :mod:`peel_jax.solver.engine` ->
:mod:`~peel_jax.inversion.report`. Measurements (drivers, stem methods, refinement): ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from peel_jax import images as _images
from peel_jax import metrics as _metrics
from peel_jax._certify import certify_block
from peel_jax._certify_network import informative_values, path_informative_values
from peel_jax._features import features
from peel_jax.inversion import plan as _plan
from peel_jax.inversion import config as _config
from peel_jax.inversion.config import NetworkConfig
from peel_jax.inversion.drivers import Clock, Progress, Solved, run_units
from peel_jax.inversion.report import BlockReport, NetworkReport, RefineReport
from peel_jax.problems.preimage import natural_preimage
from peel_jax.problems.refine import refine_image
from peel_jax.problems.stem import invert_stem
from peel_jax.solver.engine import is_traced
from peel_jax.solver.info import relative_error, relative_residual


def _block_report(rec: Solved, truth: dict, in_name, out_name, cert=None) -> BlockReport:
  x_true, y_true = truth.get(in_name), truth.get(out_name)
  err = None if x_true is None else relative_error(rec.x_hat, jnp.asarray(x_true))
  out_err = None if y_true is None else relative_residual(rec.block, rec.x_hat, jnp.asarray(y_true))
  i = rec.info
  return BlockReport(residual=i.residual, input_rel_error=err, output_rel_error=out_err,
                     max_violation=i.max_violation, iterations=i.iterations, converged=i.converged,
                     seconds=rec.seconds, name=rec.name, certificate=cert)


def _invert_stem(stem, y, key, cfg: NetworkConfig, box):
  """The stem's :class:`Solved` record (pixel box ``box``: one image's ``(lo, hi)`` or None)."""
  scfg = cfg.stem_config
  clock = Clock(y)
  if cfg.block_solver is not None and stem.spec.pool == "none":
    x_img, info = cfg.block_solver(stem, y, key=jax.random.fold_in(key, 0))
    its = info.iterations
  else:
    x_img, its = invert_stem(stem, y, key=jax.random.fold_in(key, 0), config=scfg, box=box, method=cfg.stem_method)
  dt = clock.stop(x_img)
  res = relative_residual(stem, x_img, y)
  viol = jnp.zeros(res.shape, res.dtype)
  if box is not None:
    over = jnp.maximum(box[0][None] - x_img, x_img - box[1][None])
    viol = jnp.maximum(jnp.max(over.reshape(x_img.shape[0], -1), axis=1), 0.0)
  info = _StemInfo(res, viol, its, jnp.isfinite(res) & (res <= scfg.tol * 1.0001))
  return Solved("stem", stem, x_img, y, info, dt)


class _StemInfo:
  def __init__(self, residual, max_violation, iterations, converged):
    self.residual, self.max_violation, self.iterations, self.converged = residual, max_violation, iterations, converged


def _denormalize(x):
  std, mean = (jnp.asarray(a, x.dtype).reshape(1, 1, 1, -1) for a in (_images.IMAGENET_STD, _images.IMAGENET_MEAN))
  return jnp.clip(x * std + mean, 0.0, 1.0)


def _figures(model, variables, layer, x, observed, image):
  """``{'observation_residual', 'mse', 'psnr', 'ssim'}`` per image (image metrics: eager only, else None)."""
  out = {"observation_residual": _plan.observation_residual(model, variables, layer, x, observed),
         "mse": None, "psnr": None, "ssim": None}
  if image is not None and not is_traced(x, image):
    out.update(_metrics.image_metrics(np.asarray(_denormalize(x)), np.asarray(_denormalize(image))))
  return out


def _refine(model, variables, layer, observed, x_img, figures, key, cfg: NetworkConfig, box, underdetermined):
  """The end-to-end refinement from the block-wise (or the better of it and M-V's) estimate."""
  clock = Clock(observed)
  from_prior = jnp.zeros(observed.shape[:1], bool)
  if cfg.refine_start == "best":
    x_img, from_prior = _better_start(model, variables, layer, observed, x_img, figures, key, cfg)
  if cfg.prior == "auto":
    with_prior = underdetermined | _path_underdetermined(model, variables, layer, x_img)
  else:
    with_prior = jnp.full(underdetermined.shape, cfg.prior is not None)
  x_img, k = _refine_solve(model, variables, layer, observed, x_img, cfg, box, with_prior)
  return x_img, RefineReport(iterations=k, seconds=clock.stop(x_img), from_prior=from_prior, with_prior=with_prior,
                             blockwise=figures)


def _path_underdetermined(model, variables, layer, x_img):
  """``(N,) bool``: at the start ``x_img``, some gated layer on the way to ``layer`` has fewer values that vary with
  the pixels than the image has pixel values (:func:`peel_jax.certify_network`'s path count: non-zero values, a
  max-pool's distinct maxima). The Jacobian there has a null space, so the observation cannot pin the image down
  near the start, whatever its own count says."""
  counts, _ = path_informative_values(model, variables, layer, x_img)
  if counts.shape[1] == 0:
    return jnp.zeros(x_img.shape[:1], bool)
  return jnp.min(counts, axis=1) < math.prod(x_img.shape[1:])


def _better_start(model, variables, layer, observed, x_img, figures, key, cfg: NetworkConfig):
  """``(x, from_prior)``: per image, the Mahendran-Vedaldi estimate where it reproduces the observation better than
  the block-wise one, among the images whose block-wise estimate misses the refinement's tolerance. When none does
  (the block-wise pass is exact, as through the paper variant's first blocks), the estimate is not computed."""
  from peel_jax.baselines.mahendran_vedaldi import mahendran_vedaldi

  need = ~(figures["observation_residual"] <= cfg.stem_config.tol)  # a non-finite residual needs a start too

  def with_mv(x):
    x_mv, _ = mahendran_vedaldi(model, variables, observed, layer, key=jax.random.fold_in(key, 2**31 - 1),
                                box=cfg.box, steps=cfg.mv_steps, lambda_tv=cfg.mv_lambda_tv)
    better = need & (_plan.observation_residual(model, variables, layer, x_mv, observed)
                     < figures["observation_residual"])
    return jnp.where(better[:, None, None, None], x_mv, x), better

  def without(x):
    return x, jnp.zeros(need.shape, bool)

  if not is_traced(need):
    return with_mv(x_img) if bool(np.any(np.asarray(need))) else without(x_img)
  return jax.lax.cond(jnp.any(need), with_mv, without, x_img)


def _prior_rho(model, layer, cfg: NetworkConfig) -> float:
  if cfg.prior_rho is not None:
    return cfg.prior_rho
  from peel_jax.problems import pool_choice

  if pool_choice.applies(model, layer):
    return _config.POOL_CHOICE_RHO
  past_pool = model.stem_pool == "max" and layer not in ("relu", "maxpool")
  return _config.PAST_POOL_RHO if past_pool else _config.PRIOR_RHO


def _refine_solve(model, variables, layer, observed, x_img, cfg: NetworkConfig, box, with_prior):
  """``(x, iterations)``: the prior-free fit where no image gets the prior, else the smoothest exact preimage
  (``lambda_tv`` 0 on the images without the prior), from ``x_img``."""
  from peel_jax.baselines.mahendran_vedaldi import pixel_scale

  def free(x):
    return refine_image(model, variables, layer, observed, x, box=box, config=cfg.stem_config, iters=cfg.refine_iters)

  def smoothest(x):
    config = dataclasses.replace(cfg.stem_config, rho=_prior_rho(model, layer, cfg))
    lam = jnp.where(with_prior, jnp.float32(cfg.prior_weight), jnp.float32(0.0))
    x, k, _ = natural_preimage(model, variables, layer, observed, x, box=box, lambda_tv=lam,
                               pixel_scale=pixel_scale(cfg.box), config=config, iters=cfg.refine_iters)
    return x, k

  if cfg.prior is None:
    return free(x_img)
  if cfg.prior == "tv":
    return smoothest(x_img)
  if not is_traced(with_prior):
    return smoothest(x_img) if bool(np.any(np.asarray(with_prior))) else free(x_img)
  return jax.lax.cond(jnp.any(with_prior), smoothest, free, x_img)


def _certificates(solved: list[Solved], key, cfg: NetworkConfig):
  if not cfg.certify:
    return [None] * len(solved)
  if is_traced(*(r.x_hat for r in solved)):
    raise ValueError("certify=True cannot run under jax.jit (its multistart test is eager); certify outside jit")
  return [certify_block(r.block, r.x_hat, r.y, key=jax.random.fold_in(key, i), starts=cfg.certify_starts,
                        solver_kwargs={"config": cfg.block}) for i, r in enumerate(solved)]


def _prepare(model, variables, observed, layer, image, true_features, cfg):
  _plan.check_layer(model, layer)
  cfg = (NetworkConfig() if cfg is None else cfg).validate()
  observed = jnp.asarray(observed)
  batched = observed.ndim == 4
  observed = observed if batched else observed[None]
  truth = dict(true_features or {})
  if image is not None:
    image = jnp.asarray(image)
    image = image if image.ndim == 4 else image[None]
    if true_features is None:
      truth = dict(features(model, variables, image))
    truth["__image__"] = image
  return cfg, observed, batched, image, truth


def invert_network(model, variables, observed: jax.Array, layer: str, *, config: NetworkConfig | None = None,
                   key: jax.Array | None = None, image: jax.Array | None = None, true_features: dict | None = None,
                   progress: bool | Callable[[str, int, int], None] | None = None):
  """Recovers the input images of ``model`` from the output of ``layer``, block by block, deepest first.

  The paper's backward pass: for the deepest observed block down to ``layer1.0``, ``x_b = argmin`` of block ``b``'s
  problem (:mod:`peel_jax.problems.block`) at the observation ``y_b = x_{b+1}``; then the stem
  (:mod:`peel_jax.problems.stem`); then, if ``config.refine_iters`` (the default: 200), a solve towards an exact
  preimage over the pixel box from the better start by observation residual (block-wise or Mahendran-Vedaldi):
  ``min_x ||f(x) - observed||^2`` (:mod:`peel_jax.problems.refine`) where the observation determines the image by
  count, ``min R_tv(x) s.t. f(x) = observed`` (:mod:`peel_jax.problems.preimage`) where it does not
  (``config.prior``). ``NetworkConfig.blockwise()`` is the paper's attack alone. With ``config.driver='scan'`` the
  whole pass is traceable:
  ``jax.jit(functools.partial(invert_network, model, variables, layer=L, config=cfg))(observed)``.

  Args:
    model: a :class:`peel_jax.models.ResNet`; ``variables``: its Flax variables.
    observed: the output of ``layer``, ``(N, H, W, C)`` float32 (one image ``(H, W, C)`` is accepted).
    layer: one of :func:`peel_jax.inversion.plan.invertible_layers` (``'layer3'``, ``'layer2.1'``, ``'maxpool'``,
      ``'relu'`` ...).
    config: a :class:`NetworkConfig` (default ``NetworkConfig()``).
    key: PRNG key (random starts, the stem start's noise); default ``jax.random.key(0)``.
    image: the original normalised images ``(N, H, W, 3)``, for input errors and (eagerly) MSE/PSNR/SSIM.
    true_features: ``peel_jax.features(model, variables, image)`` or a subset, for per-block input errors.
    progress: ``True`` for a tqdm bar on stderr, or a callable ``(block_name, done, total)``.

  Returns:
    ``(images, report)``: the recovered normalised images ``(N, H, W, 3)`` (unbatched if ``observed`` was) and a
    :class:`NetworkReport` (a pytree; numpy leaves when run eagerly; image metrics and seconds only eagerly).

  Raises:
    KeyError: an unknown ``layer`` (the message lists the valid names).
    ValueError: a bad config (driver, stem method, box, ...), ``certify=True`` under ``jit``, or an observation that
      does not fit ``layer``.
  """
  cfg, observed, batched, image, truth = _prepare(model, variables, observed, layer, image, true_features, config)
  key = jax.random.key(0) if key is None else key
  clock = Clock(observed)
  units = _plan.plan(model, variables, layer, cfg.driver)
  bar = Progress(None if is_traced(observed) else progress, sum(u.size for u in units) + 1)
  stem = _plan.stem_of(model, variables, layer)
  try:
    y, solved = run_units(units, observed, key, model, cfg.block, cfg.block_solver, bar)
    box = _plan.full_box(cfg.box, stem.input_shape(y.shape)[1:], y.dtype)
    solved.append(_invert_stem(stem, y, key, cfg, box))
    bar.update("stem")
  finally:
    bar.close()
  reports = _reports(model, layer, solved, truth, _certificates(solved[:-1], key, cfg) + [None])
  x_img = solved[-1].x_hat
  figures = _figures(model, variables, layer, x_img, observed, image)
  informative = informative_values(model, layer, observed)
  null_bound = jnp.maximum(0, np.prod(x_img.shape[1:]) - informative)
  refine = None
  if cfg.refine_iters > 0:
    x_img, refine = _refine(model, variables, layer, observed, x_img, figures, key, cfg, box, null_bound > 0)
    figures = _figures(model, variables, layer, x_img, observed, image)
  report = NetworkReport(blocks=reports, seconds=clock.stop(x_img), refine=refine, informative_values=informative,
                         null_dim_bound=null_bound,
                         estimates={r.name: r.x_hat for r in solved}, layer=layer, driver=cfg.driver,
                         stem_method="none" if stem.spec.pool == "none" else cfg.stem_method, **figures)
  if not is_traced(x_img):
    report = report.to_numpy()
  return (x_img if batched else x_img[0]), report


def _reports(model, layer, solved: list[Solved], truth, certs) -> list[BlockReport]:
  out = []
  for rec, cert in zip(solved, certs):
    if rec.name == "stem":
      in_name, out_name = "__image__", ("relu" if layer == "relu" else "maxpool")
    else:
      s, b = rec.name[len("layer"):].split(".")
      in_name, out_name = _plan.input_name(model, int(s) - 1, int(b)), rec.name
    out.append(_block_report(rec, truth, in_name, out_name, cert))
  return out
