"""Mahendran & Vedaldi's optimisation inversion of a whole network prefix, in JAX: the classic pixel-space baseline.

A. Mahendran and A. Vedaldi, "Understanding Deep Image Representations by Inverting Them", CVPR 2015
(arXiv 1412.0035); the normalisation follows their Sec. 3 and its cleaner restatement in "Visualizing Deep
Convolutional Neural Networks Using Natural Pre-images", IJCV 2016. From the output ``Phi0`` of ``layer``, with
``Phi`` the network up to ``layer``, each image solves

    min_x  ||Phi(x) - Phi0||^2 / ||Phi0||^2  +  lambda_alpha R_alpha(x)  +  lambda_tv R_tv(x),    lo <= x <= hi,

    R_alpha(x) = N_alpha(x) / (H W B^alpha),       N_alpha(x)  = sum_{ijc} |x_ijc|^alpha,
    R_tv(x)    = TV_beta(x) / (H W V^beta),        TV_beta(x)  = sum_{ijc} ((x_{i,j+1,c} - x_ijc)^2
                                                                        + (x_{i+1,j,c} - x_ijc)^2)^(beta/2),

with the differences past the last row/column taken as zero (the authors' code, ``deep-goggle``'s ``tv``) and the
total variation taken per channel, summed over channels, as in both papers.

Normalisation (the papers' Sec. 3 "balancing the different terms"). The data term is relative, so it starts near 1
and vanishes at an exact preimage. The regularisers are made dimensionless by measuring the image in units of the
pixel range: the CVPR paper asks that the reconstruction stay in ``[-B, B]`` ("B = 128 for most CNN
implementations", i.e. the largest magnitude of a mean-subtracted 8-bit pixel) and takes
``lambda_alpha ~ 1 / (H W B^alpha)``; here images are ImageNet-normalised and ``B`` is the largest magnitude a valid
pixel value takes in the box, ``max_c max(|lo_c|, |hi_c|) = 2.64`` for the ImageNet box (for a custom box, its own;
for ``box=None``, the ImageNet one). The total variation is measured in units of a typical difference between
neighbouring pixels, ``V = B / 6.5 = 0.41`` (the IJCV paper's ratio). So ``R_alpha <= C = 3`` for any image in the
box; on the bundled photos (:mod:`peel_jax.images`, 96 and 224 px) ``R_alpha`` is 0.007-0.17 (alpha = 6) and
``R_tv`` 1.2-8 (beta = 2): at ``lambda = 1`` a natural photo's prior is of the order of the data term of a blank
guess (1).

The authors' released MATLAB code scales both regularisers by the squared norm of a typical image instead; with
their CNN settings (``lambdaTV`` = 1, 10, 100 for shallow, middle, deep AlexNet layers, ``TVbeta = 2``,
``lambdaL2 = 8e-10`` on ``x^6`` in 8-bit units) the same balance is ``lambda_tv`` ~ 0.03, 0.3, 3 and
``lambda_alpha`` ~ 0.15 here. Those settings were chosen to make pre-images of a *trained* network look natural; here
the baseline measures how much of the image an attacker recovers, so the defaults are smaller (measured below).

Optimiser: the authors' momentum gradient descent (``optax.sgd``, momentum 0.9; their ``invert_nn.m``), with the
gradient scaled by ``H W C``, the expected squared norm of an ImageNet-normalised image (unit-variance channels), as
their code scales it by the squared norm of a typical image ``x0_sigma^2``. With the relative data term that makes
the learning rate dimensionless: for a locally linear ``Phi = g A`` the data term's gradient is
``2 A^T A (x - x*) / ||A x*||^2`` whatever the gain ``g``, so ``learning_rate`` ~ 0.3-1 suited every layer here.
Adam (``optimizer='adam'``) is offered but not the default: normalising each pixel's step amplifies the directions
the observation barely constrains (high frequencies), which plain gradient descent moves slowly. The schedule is the
authors' (their CNN runs: 100, 200, 100 steps at ``lr``, ``lr/10``, ``lr/100``): the learning rate drops tenfold
after 25% and again after 75% of ``steps`` (the authors also zero the momentum at each drop; this does not). The
box is enforced by projection (clipping) after every step, the exact form of the IJCV paper's ``B+`` hard
constraint. The start is ``init_scale * N(0, I)`` (about the ImageNet mean colour; image ``i`` draws from
``fold_in(key, i)``), clipped to the box.

Measured defaults and alternatives, and the batching tolerance: ``benchmarks/RESULTS.md`` ("Mahendran-Vedaldi
defaults"). Every image is independent (per-image terms, elementwise optimiser and projection, one key per image).
The steps run on the solver engine (:mod:`peel_jax.solver.engine`: per-image state, masks, budget, drivers) with
this update rule (:data:`METHODS`); no merit is tracked (the authors' fixed schedule: the last iterate is
returned). The schedule and every hyperparameter are traced, so one compiled step serves any ``steps``,
``learning_rate`` or multiplier.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peel_jax import images as _images
from peel_jax._features import features
from peel_jax.inversion.plan import full_box as _full_box
from peel_jax.inversion.plan import image_shape, invertible_layers
from peel_jax.inversion.plan import observation_residual as _observation_residual
from peel_jax.problems import refine as _refine
from peel_jax.solver import engine
from peel_jax.solver.config import SolverConfig

TV_RATIO = 6.5  # V = B / TV_RATIO: the IJCV paper's typical neighbour difference relative to the pixel scale
OPTIMIZERS = ("adam", "momentum")
MOMENTUM = 0.9


class MVInfo(NamedTuple):
  """Per-image diagnostics of :func:`mahendran_vedaldi` at the returned images (leading axis = batch).

  Attributes:
    residual: the relative observation residual ``||Phi(x) - Phi0|| / ||Phi0||`` (float32).
    objective: the final objective ``data + lambda_alpha * alpha_term + lambda_tv * tv_term``.
    data: ``||Phi(x) - Phi0||^2 / ||Phi0||^2`` (the residual squared).
    alpha_term: ``R_alpha(x)``, the normalised alpha-norm prior (before its multiplier).
    tv_term: ``R_tv(x)``, the normalised total variation prior (before its multiplier).
    steps: optimisation steps taken (int32).
  """

  residual: jax.Array
  objective: jax.Array
  data: jax.Array
  alpha_term: jax.Array
  tv_term: jax.Array
  steps: jax.Array


# --- the priors ----------------------------------------------------------------------------------------------------


def _safe_pow(s: jax.Array, p) -> jax.Array:
  """``s ** p`` for ``s >= 0``, with value and gradient 0 at ``s = 0`` (a subgradient; ``p < 1`` is singular)."""
  pos = s > 0
  return jnp.where(pos, jnp.where(pos, s, 1.0) ** p, 0.0)


def alpha_norm(x: jax.Array, alpha: float = 6.0) -> jax.Array:
  """``N_alpha(x) = sum_{ijc} |x_ijc|^alpha`` over the last three axes (one image ``(H, W, C)`` -> a scalar, a batch
  ``(N, H, W, C)`` -> ``(N,)``), unnormalised. Differentiable, with gradient 0 at ``x = 0`` for any ``alpha > 0``."""
  x = jnp.asarray(x)
  return jnp.sum(_safe_pow(x * x, 0.5 * alpha), axis=(-3, -2, -1))


def total_variation(x: jax.Array, beta: float = 2.0) -> jax.Array:
  """``TV_beta(x) = sum_{ijc} ((x_{i,j+1,c} - x_ijc)^2 + (x_{i+1,j,c} - x_ijc)^2)^(beta/2)``, unnormalised.

  Over the last three axes ``(H, W, C)`` (rows ``i``, columns ``j``, per channel ``c``); a difference that would
  leave the image (last row, last column) is zero, as in the authors' code. One image gives a scalar, a batch
  ``(N,)``. At a zero gradient the value and its gradient are 0 for any ``beta > 0``.
  """
  x = jnp.asarray(x)
  dj = jnp.concatenate([x[..., :, 1:, :] - x[..., :, :-1, :], jnp.zeros_like(x[..., :, :1, :])], axis=-2)
  di = jnp.concatenate([x[..., 1:, :, :] - x[..., :-1, :, :], jnp.zeros_like(x[..., :1, :, :])], axis=-3)
  return jnp.sum(_safe_pow(dj * dj + di * di, 0.5 * beta), axis=(-3, -2, -1))


def pixel_scale(box: Any = "imagenet") -> float:
  """``B``: the largest magnitude of a valid pixel value in ``box`` (``'imagenet'``/``None``: the ImageNet box,
  2.64; ``(lo, hi)``: scalars or per-channel arrays in normalised units)."""
  if box is None or (isinstance(box, str) and box == "imagenet"):
    box = _images.pixel_box()
  elif isinstance(box, str):
    raise ValueError(f"unknown box {box!r}; pass 'imagenet', None or (lo, hi)")
  lo, hi = (np.asarray(b, np.float64) for b in box)
  b = float(max(np.max(np.abs(lo)), np.max(np.abs(hi))))
  if not np.isfinite(b) or b <= 0:
    raise ValueError(f"the box must be finite and not all zero to set the pixel scale, got {box!r}")
  return b


def _terms(model, variables, layer, x, observed, hp):
  """Per image ``(data, R_alpha, R_tv)`` (see the module docstring); ``x`` and ``observed`` batched."""
  phi = features(model, variables, x, layer)[layer]
  axes = tuple(range(1, observed.ndim))
  r = phi - observed
  data = jnp.sum(r * r, axes) / jnp.maximum(jnp.sum(observed * observed, axes), 1e-30)
  hw = x.shape[1] * x.shape[2]
  ra = alpha_norm(x / hp["b"], hp["alpha"]) / hw
  rv = total_variation(x / hp["v"], hp["beta"]) / hw
  return data, ra, rv


def _objective(model, variables, layer, x, observed, hp):
  data, ra, rv = _terms(model, variables, layer, x, observed, hp)
  return data + hp["lambda_alpha"] * ra + hp["lambda_tv"] * rv


# --- the optimisation ----------------------------------------------------------------------------------------------


def _optimizer(name: str, hp: dict) -> optax.GradientTransformation:
  """Adam or momentum on the authors' schedule: ``lr`` until step ``b1``, ``lr/10`` until ``b2``, then ``lr/100``.

  The schedule's values are traced (``hp``), so one compiled chunk serves any ``steps`` and ``learning_rate``.
  """

  def schedule(count):
    return hp["lr"] * jnp.where(count < hp["b1"], 1.0, jnp.where(count < hp["b2"], 0.1, 0.01))

  if name == "adam":
    return optax.adam(schedule)
  return optax.sgd(schedule, momentum=MOMENTUM)


class _Shared(NamedTuple):
  net: Any  # peel_jax.problems.refine.Net: the network up to the layer and the pixel box
  hp: dict  # the hyperparameters (traced: one compilation serves any values)


def _residual(x, d, sh: _Shared):
  return _refine.OBSERVATION.residual(x, d, sh.net)


def _bounds(x, d, sh: _Shared):
  return sh.net.lo, sh.net.hi


# The observation residual with the pixel box; no merit: the method spends its whole budget (the authors' fixed
# schedule) and the last iterate is returned.
PROBLEM = engine.Problem(residual=_residual, bounds=_bounds, merit=None)


def _mv_init(optimizer, problem, config, x, data, shared, lam, mu, rho):
  return _optimizer(optimizer, shared.hp).init(x)


def _mv_step(optimizer, problem, config, x, state, data, sh: _Shared, lam, mu, rho, k):
  """One projected optimiser step on one image's objective (see the module docstring)."""
  opt = _optimizer(optimizer, sh.hp)
  # Momentum: the gradient times E||x||^2 = H W C (unit-variance channels), as the authors scale by x0_sigma^2.
  scale = 1.0 if optimizer == "adam" else float(np.prod(x.shape))
  net = sh.net
  loss = lambda t: _objective(net.model, net.variables, net.layer, t[None], data.y[None], sh.hp)[0]
  upd, state = opt.update(jax.grad(loss)(x) * scale, state, x)
  return jnp.clip(optax.apply_updates(x, upd), net.lo, net.hi), state


METHODS = {name: engine.Method(functools.partial(_mv_init, name), functools.partial(_mv_step, name))
           for name in OPTIMIZERS}


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def _final_terms(model, variables, layer, x, observed, hp):
  data, ra, rv = _terms(model, variables, layer, x, observed, hp)
  return data + hp["lambda_alpha"] * ra + hp["lambda_tv"] * rv, data, ra, rv


def objective_terms(model, variables, observed, layer: str, images, *, alpha: float = 6.0, beta: float = 2.0,
                    box: Any = "imagenet") -> dict:
  """``{'data', 'alpha', 'tv'}``, per image: the three terms of the objective at ``images`` (batched), without the
  multipliers, normalised as :func:`mahendran_vedaldi` normalises them (``box`` sets the pixel scale ``B``)."""
  b = pixel_scale(box)
  hp = {"alpha": jnp.float32(alpha), "beta": jnp.float32(beta), "b": jnp.float32(b),
        "v": jnp.float32(b / TV_RATIO), "lambda_alpha": jnp.float32(0.0), "lambda_tv": jnp.float32(0.0)}
  observed = jnp.asarray(observed)
  if layer not in invertible_layers(model):
    raise KeyError(f"unknown layer {layer!r}; valid layers: {', '.join(invertible_layers(model))}")
  _, data, ra, rv = _final_terms(model, variables, layer, jnp.asarray(images), jnp.asarray(observed), hp)
  return {"data": data, "alpha": ra, "tv": rv}


def mahendran_vedaldi(
    model,
    variables,
    observed: jax.Array,
    layer: str,
    *,
    key: jax.Array,
    steps: int = 400,
    learning_rate: float = 0.5,
    alpha: float = 6.0,
    beta: float = 2.0,
    lambda_alpha: float = 1e-3,
    lambda_tv: float = 1e-3,
    box: Any = "imagenet",
    optimizer: str = "momentum",
    init_scale: float = 0.05,
    chunk: int = 10,
    input_shape: tuple[int, int] | None = None,
) -> tuple[jax.Array, MVInfo]:
  """Recovers the input images of ``model`` from the output of ``layer`` by Mahendran & Vedaldi's regularised
  optimisation over the pixels (see the module docstring for the objective, its normalisation and the defaults).

  Args:
    model: a :class:`peel_jax.models.ResNet`.
    variables: its Flax variables.
    observed: the output ``Phi0`` of ``layer`` for a batch, ``(N, H', W', C')`` float32 (one observation
      ``(H', W', C')`` is accepted and gives one image).
    layer: one of :func:`peel_jax.inversion.invertible_layers` (the names :func:`peel_jax.invert_network`
      accepts: ``'relu'``, ``'maxpool'``, ``'layerK'``, ``'layerK.J'``).
    key: PRNG key of the starts (image ``i`` starts from ``fold_in(key, i)``).
    steps: optimiser steps (the authors' CNN runs: 400).
    learning_rate: the initial learning rate, divided by 10 after 25% and again after 75% of ``steps``
      (dimensionless for ``'momentum'``, see the module docstring; for ``'adam'``, about the per-step move of a
      normalised pixel value, and 0.1-0.3 works better there).
    alpha: exponent of the alpha-norm prior (the paper: 6).
    beta: exponent of the total variation prior (the paper: 2; ``beta < 1`` is singular at flat regions, where the
      gradient is taken as 0).
    lambda_alpha: multiplier of ``R_alpha`` (dimensionless, see the module docstring; 0 turns it off).
    lambda_tv: multiplier of ``R_tv`` (dimensionless; 0 turns it off).
    box: pixel bounds enforced by projection: ``'imagenet'`` (the ImageNet-normalised ``[0, 1]``, per channel),
      ``None`` (no bounds), or ``(lo, hi)`` (scalars or per-channel arrays in normalised units). Also sets ``B``.
    optimizer: ``'momentum'`` (default: the authors' heavy-ball gradient descent, momentum 0.9, on the gradient
      scaled by ``H W C``) or ``'adam'``.
    init_scale: standard deviation of the start's noise, in normalised units.
    chunk: unrolled steps per jitted call (the Python-driven loop; larger compiles longer).
    input_shape: ``(H, W)`` of the images; default: inferred from ``observed`` through the strides (even sizes).

  Returns:
    ``(images, info)``: the recovered normalised images ``(N, H, W, 3)`` (unbatched if ``observed`` was) and an
    :class:`MVInfo` of per-image arrays (batched even for one observation).

  Raises:
    KeyError: an unknown ``layer`` (the message lists the valid names).
    ValueError: a bad optimiser, box, step count or hyperparameter, or an observation that does not fit ``layer``.
  """
  _check_options(optimizer, steps, chunk, learning_rate=learning_rate, alpha=alpha, beta=beta,
                 lambda_alpha=lambda_alpha, lambda_tv=lambda_tv, init_scale=init_scale)
  steps, chunk = int(steps), int(chunk)
  observed, batched, shape = _observation(model, variables, observed, layer, input_shape)
  n = observed.shape[0]
  b = pixel_scale(box)
  lo, hi = engine.box_bounds(_full_box(box, shape[1:], jnp.float32), shape[1:], jnp.float32)
  hp = {"alpha": jnp.float32(alpha), "beta": jnp.float32(beta), "b": jnp.float32(b),
        "v": jnp.float32(b / TV_RATIO), "lambda_alpha": jnp.float32(lambda_alpha),
        "lambda_tv": jnp.float32(lambda_tv), "lr": jnp.float32(learning_rate), "init_scale": jnp.float32(init_scale),
        "b1": jnp.int32(max(1, steps // 4)), "b2": jnp.int32(max(2, (3 * steps) // 4))}
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  x = jax.vmap(lambda k: hp["init_scale"] * jax.random.normal(k, shape[1:], jnp.float32))(keys)
  x = jnp.clip(x, lo[None], hi[None])
  if steps:
    data = _refine.RefineData(observed, jnp.maximum(jnp.sqrt(jnp.sum(observed**2, axis=(1, 2, 3))), 1e-30))
    st = engine.solve(PROBLEM, SolverConfig(tol=0.0, steps_per_call=chunk), x, data,
                      _Shared(_refine.Net(variables, lo, hi, model, layer), hp), method=METHODS[optimizer],
                      budget=steps)
    x = st.u
  obj, data, ra, rv = _final_terms(model, variables, layer, x, observed, hp)
  info = MVInfo(residual=_observation_residual(model, variables, layer, x, observed), objective=obj, data=data,
                alpha_term=ra, tv_term=rv, steps=jnp.full((n,), steps, jnp.int32))
  return (x if batched else x[0]), info


def _check_options(optimizer, steps, chunk, **values):
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  if int(chunk) != chunk or chunk < 1:
    raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
  for name in ("learning_rate", "alpha", "beta"):
    if not (np.isfinite(values[name]) and values[name] > 0):
      raise ValueError(f"{name} must be positive and finite, got {values[name]!r}")
  for name in ("lambda_alpha", "lambda_tv", "init_scale"):
    if not (np.isfinite(values[name]) and values[name] >= 0):
      raise ValueError(f"{name} must be non-negative and finite, got {values[name]!r}")


def _observation(model, variables, observed, layer, input_shape):
  """``(observed (N, ...), batched, image shape (N, H, W, 3))``; raises on a layer or shape that does not fit."""
  valid = invertible_layers(model)
  if layer not in valid:
    raise KeyError(f"cannot invert from layer {layer!r}; valid layers: {', '.join(valid)}")
  observed = jnp.asarray(observed, jnp.float32)
  batched = observed.ndim == 4
  if not batched:
    observed = observed[None]
  if observed.ndim != 4:
    raise ValueError(f"observed must be (N, H, W, C) or (H, W, C), got shape {observed.shape}")
  n = observed.shape[0]
  if input_shape is None:
    shape = image_shape(model, variables, layer, observed.shape)
  else:
    shape = (n, int(input_shape[0]), int(input_shape[1]), 3)
  expected = jax.eval_shape(lambda t: features(model, variables, t, layer)[layer],
                            jax.ShapeDtypeStruct(shape, jnp.float32)).shape
  if tuple(expected) != tuple(observed.shape):
    raise ValueError(f"an observation of {layer!r} for {shape[1]}x{shape[2]} images has shape {tuple(expected)}, "
                     f"got {tuple(observed.shape)} (pass input_shape=(H, W) for odd image sizes)")
  return observed, batched, shape
