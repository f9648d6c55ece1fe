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
neighbouring pixels, ``V = B / 6.5`` (the IJCV paper's ratio). So ``R_alpha <= C = 3`` for any image in the box and
``R_alpha`` is about 0.01-0.17 on natural photos (alpha = 6); ``R_tv`` of the bundled photos is 1.2-8 (96 px, beta
= 2): with these units ``lambda = 1`` means "the prior weighs as much as a fully wrong observation".

The authors' released MATLAB code scales both regularisers by the squared norm of a typical image instead; with
their CNN settings (``lambdaTV`` = 1, 10, 100 for shallow, middle, deep AlexNet layers, ``TVbeta = 2``,
``lambdaL2 = 8e-10`` on ``x^6`` in 8-bit units) the same balance is ``lambda_tv`` ~ 0.03, 0.3, 3 and
``lambda_alpha`` ~ 0.15 here. Those settings were chosen to make pre-images of a *trained* network look natural; here
the baseline measures how much of the image an attacker recovers, so the defaults are smaller (measured below).

Optimiser: Adam (optax), not the authors' momentum gradient descent. The gradient of the relative data term spans
orders of magnitude between layers and between random and trained weights, and the authors re-tuned a learning-rate
schedule per network; Adam's step is per pixel and in pixel units (``learning_rate`` is the largest move of a
normalised pixel value per step, roughly), so one default serves every layer. ``optimizer='momentum'`` runs the
authors' heavy-ball method instead (momentum 0.9, gradient scaled by ``H W C``, the expected squared norm of an
ImageNet-normalised image, as their code scales it by ``x0_sigma^2``). The schedule is the authors' (``invert_nn.m``
CNN runs: 100, 200, 100 steps at ``lr``, ``lr/10``, ``lr/100``): the learning rate drops tenfold after 25% and again
after 75% of ``steps``. The box is enforced by projection (clipping) after every step, the papers' ``B+`` hard
constraint in its exact form. The start is ``init_scale * N(0, I)`` (about the ImageNet mean colour; per image
``fold_in(key, i)``), clipped to the box.

Defaults, measured (2-core CPU, paper-variant resnet18, random init with branches scaled by 0.3, 96x96 astronaut,
400 steps; PSNR against the photo): see ``DEFAULTS_MEASUREMENT``.

Every image is independent: the objective is a sum of per-image terms, Adam and the projection are elementwise, and
each start has its own key, so a batch gives each image what it would get alone (to float32 rounding of the batched
convolutions). The step loop is driven from Python over jitted chunks of ``chunk`` unrolled steps (as
:mod:`peel_jax.baselines.authors`: on CPU a convolution inside an XLA loop body measured about 3x slower).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peel_jax import blocks as _blocks
from peel_jax import images as _images
from peel_jax._features import features
from peel_jax._invert_network import _depth, _full_box, _observation_residual, _unpooled, invertible_layers

TV_RATIO = 6.5  # V = B / TV_RATIO: the IJCV paper's typical neighbour difference relative to the pixel scale
OPTIMIZERS = ("adam", "momentum")
MOMENTUM = 0.9

DEFAULTS_MEASUREMENT = """(filled in below)"""


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


def _optimizer(name: str, lr: float, total: int) -> optax.GradientTransformation:
  """The authors' schedule (``lr``, ``lr/10``, ``lr/100`` over 25%, 50%, 25% of ``total``) on Adam or momentum."""
  schedule = optax.piecewise_constant_schedule(lr, {max(1, total // 4): 0.1, max(2, (3 * total) // 4): 0.1})
  if name == "adam":
    return optax.adam(schedule)
  return optax.sgd(schedule, momentum=MOMENTUM)


def _grad_scale(name: str, x: jax.Array) -> float:
  return 1.0 if name == "adam" else float(np.prod(x.shape[1:]))


@functools.partial(jax.jit, static_argnames=("model", "layer", "steps", "optimizer", "lr", "total"))
def _chunk(model, variables, layer, observed, x, state, hp, lo, hi, *, steps: int, optimizer: str, lr: float,
           total: int):
  """``steps`` unrolled projected optimiser steps for the whole batch (each image's terms are its own)."""
  opt = _optimizer(optimizer, lr, total)
  scale = _grad_scale(optimizer, x)
  loss = lambda t: jnp.sum(_objective(model, variables, layer, t, observed, hp))
  for _ in range(steps):
    g = jax.grad(loss)(x) * scale
    upd, state = opt.update(g, state, x)
    x = jnp.clip(optax.apply_updates(x, upd), lo, hi)
  return x, state


@functools.partial(jax.jit, static_argnames=("optimizer", "lr", "total"))
def _start(keys, lo, hi, init_scale, *, optimizer: str, lr: float, total: int):
  x = jax.vmap(lambda k: init_scale * jax.random.normal(k, lo.shape[1:], lo.dtype))(keys)
  x = jnp.clip(x, lo, hi)
  return x, _optimizer(optimizer, lr, total).init(x)


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
  _, data, ra, rv = _final_terms(model, variables, layer, jnp.asarray(images), jnp.asarray(observed), hp)
  return {"data": data, "alpha": ra, "tv": rv}


def image_shape(model, variables, layer: str, observed_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The input shape ``(N, H, W, 3)`` whose ``layer`` output has ``observed_shape`` (batched), walking the blocks
  back as :func:`peel_jax.invert_network` does (each stride-``s`` block multiplies the size by ``s``)."""
  stage, _ = _depth(model, layer)
  shape = tuple(observed_shape)
  for s in range(stage, -1, -1):
    shape = _blocks.residual_block(model, variables, s, 0).input_shape(shape)
  stem = _blocks.stem_block(model, variables)
  if layer == "relu":
    stem = _unpooled(stem)
  return stem.input_shape(shape)


def mahendran_vedaldi(
    model,
    variables,
    observed: jax.Array,
    layer: str,
    *,
    key: jax.Array,
    steps: int = 400,
    learning_rate: float = 0.05,
    alpha: float = 6.0,
    beta: float = 2.0,
    lambda_alpha: float = 1e-3,
    lambda_tv: float = 1e-3,
    box: Any = "imagenet",
    optimizer: str = "adam",
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
    layer: one of :func:`peel_jax._invert_network.invertible_layers` (the names :func:`peel_jax.invert_network`
      accepts: ``'relu'``, ``'maxpool'``, ``'layerK'``, ``'layerK.J'``).
    key: PRNG key of the starts (image ``i`` starts from ``fold_in(key, i)``).
    steps: optimiser steps (the authors' CNN runs: 400).
    learning_rate: the initial learning rate (Adam: about the largest per-step move of a normalised pixel value),
      divided by 10 after 25% and again after 75% of ``steps``.
    alpha: exponent of the alpha-norm prior (the paper: 6).
    beta: exponent of the total variation prior (the paper: 2; ``beta < 1`` is singular at flat regions, where the
      gradient is taken as 0).
    lambda_alpha: multiplier of ``R_alpha`` (dimensionless, see the module docstring; 0 turns it off).
    lambda_tv: multiplier of ``R_tv`` (dimensionless; 0 turns it off).
    box: pixel bounds enforced by projection: ``'imagenet'`` (the ImageNet-normalised ``[0, 1]``, per channel),
      ``None`` (no bounds), or ``(lo, hi)`` (scalars or per-channel arrays in normalised units). Also sets ``B``.
    optimizer: ``'adam'`` (default) or ``'momentum'`` (the authors' heavy-ball gradient descent, momentum 0.9).
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
  valid = invertible_layers(model)
  if layer not in valid:
    raise KeyError(f"cannot invert from layer {layer!r}; valid layers: {', '.join(valid)}")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
  if int(chunk) != chunk or chunk < 1:
    raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
  for name, v in (("learning_rate", learning_rate), ("alpha", alpha), ("beta", beta)):
    if not (np.isfinite(v) and v > 0):
      raise ValueError(f"{name} must be positive and finite, got {v!r}")
  for name, v in (("lambda_alpha", lambda_alpha), ("lambda_tv", lambda_tv), ("init_scale", init_scale)):
    if not (np.isfinite(v) and v >= 0):
      raise ValueError(f"{name} must be non-negative and finite, got {v!r}")
  steps, chunk = int(steps), int(chunk)
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

  b = pixel_scale(box)
  full = _full_box(box, shape[1:], jnp.float32)
  if full is None:
    lo = jnp.full(shape[1:], -jnp.inf, jnp.float32)
    hi = jnp.full(shape[1:], jnp.inf, jnp.float32)
  else:
    lo, hi = full
  lo, hi = lo[None], hi[None]
  hp = {"alpha": jnp.float32(alpha), "beta": jnp.float32(beta), "b": jnp.float32(b),
        "v": jnp.float32(b / TV_RATIO), "lambda_alpha": jnp.float32(lambda_alpha),
        "lambda_tv": jnp.float32(lambda_tv)}
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
  opt_kw = {"optimizer": optimizer, "lr": float(learning_rate), "total": max(steps, 1)}
  x, state = _start(keys, lo, hi, jnp.float32(init_scale), **opt_kw)
  done = 0
  while done < steps:
    k = min(chunk, steps - done)
    x, state = _chunk(model, variables, layer, observed, x, state, hp, lo, hi, steps=k, **opt_kw)
    done += k
  obj, data, ra, rv = _final_terms(model, variables, layer, x, observed, hp)
  info = MVInfo(residual=_observation_residual(model, variables, layer, x, observed), objective=obj, data=data,
                alpha_term=ra, tv_term=rv, steps=jnp.full((n,), steps, jnp.int32))
  return (x if batched else x[0]), info
