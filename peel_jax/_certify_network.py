"""Is the image determined by one intermediate output of the whole network? Counts, local singular values, starts.

The map ``f``: pixels -> the output of ``layer`` is piecewise linear for a ReLU network (BatchNorm folded, max or
average pooling, ReLU). Where ``f`` is differentiable (every image off the measure-zero set of kinks and pooling
ties), its Jacobian ``J`` (``M x P``, ``P`` pixel values, ``M`` observed values) has:

* **A rank bound from the counts.** Behind a ReLU a zero output says only ``z <= 0``: its row of ``J`` is zero
  (a zero max- or average-pooled ReLU output: every value in the window is zero). So ``rank J <= informative``,
  the number of non-zero observed values, and ``dim null J >= P - informative``. Where ``layer`` is not behind a
  ReLU (the paper's block: no post-add activation, outputs are signed; or an injective activation such as leaky
  ReLU, PReLU, GELU) every observed value is an equation and ``informative = M``. Every exact preimage has the
  same zero pattern as the observation, so the bound holds at every one of them, the true image included: it
  needs nothing but the observation. Zeros are exact zeros (``== 0.0``): a quantised or perturbed observation has
  fewer of them, which makes the bound smaller (an ``underdetermined`` verdict stays sound; a ``determined`` one by
  count may then be wrong).
* **A rank bound along the path, at a point.** ``f`` factors through every earlier layer, so ``rank J`` is also at
  most the non-zero values of any gated layer before ``layer`` (the stem's ReLU and pool, each block behind a
  post-add ReLU). Those values are not observed: they are counted at ``x_hat``. The max-pool's count is tighter:
  overlapping windows often share their maximum, and their rows of the Jacobian are then equal, so it counts the
  distinct positions holding a positive window maximum (at ``x_hat`` the maxima are known; observed at the pool,
  the pool itself joins the path). Where a torchvision network's
  max-pool has fewer non-zero values than pixels while a wider layer after it (a bottleneck network's ``layer1``)
  has more, only this bound sees that the image is not determined. The bound
  ``path_null_dim_bound = max(0, P - min(informative, the earlier counts at x_hat))`` is about ``x_hat``: about
  every exact preimage with ``x_hat``'s activation pattern, the truth included when ``x_hat`` is the truth.
* **Local singular values.** At ``x_hat`` (an estimate, or the truth when measuring), the smallest singular values of
  ``J`` restricted to the free pixels (those not within ``box_tol`` of a box bound) by Golub-Kahan-Lanczos
  bidiagonalisation, matrix-free (``J v`` by :func:`jax.linear_transpose` of the ``jax.vjp`` pullback, ``J^T u`` by
  the pullback), with full reorthogonalisation on both sides. After ``k`` steps, ``J V_k = U_k B_k`` with ``B_k``
  upper bidiagonal ``k x k``; the singular values of ``B_k`` are the Ritz values of ``J^T J`` on the Krylov space
  ``span V_k`` (Lanczos on ``J^T J`` from the same start), computed without squaring the condition number. By
  Cauchy interlacing the ``i``-th smallest Ritz value is at least the ``i``-th smallest singular value of ``J``
  (and the largest is at most ``sigma_max``). The Ritz vector ``v`` of the smallest one is checked by one more
  ``J v``: ``||J v|| / ||v||`` is an upper bound on the smallest singular value that holds whether or not Lanczos
  has converged (up to float32 rounding of one Jacobian-vector product, about ``1e-6 sigma_max``).

Statuses (per image), in order of precedence, and what each proves:

* ``underdetermined``: ``P > informative`` (counts only). Proves: at every exact preimage where ``f`` is
  differentiable, ``J`` has a null space of dimension at least ``null_dim_bound``; at such a preimage inside a
  linear region, moving along a null direction leaves the output unchanged, so a continuum of images reproduces the
  observation exactly, *provided the pixel box lets it move* (``free_null_dim_bound > 0`` guarantees a null
  direction that leaves the held pixels of ``x_hat`` alone, at ``x_hat`` when it is an exact preimage). It does not
  say how far apart those images are (the null directions may be small high-frequency changes), nor that a prior
  cannot pick the truth.
* ``not_injective`` (only with ``starts > 0``): two starts reached exact preimages (relative observation residual at
  most ``exact_tol``) more than ``spread_tol`` apart (relative to ``||x_hat||``). Proves the observation does not
  determine the image (up to the ``exact_tol`` reading of "exact").
* ``locally_underdetermined``: the observation's counts allow determinacy, but at ``x_hat`` an earlier gated layer
  has fewer non-zero values than pixels (``path_null_dim_bound > 0``), or a unit direction ``v`` over the free
  pixels has ``||J v|| <= null_tol * sigma_max``. Proves (exactly by count, or to float32 precision) that ``J`` at
  ``x_hat`` is singular: to first order the output does not change along a direction. It is a statement about ``x_hat``:
  about the truth only when ``x_hat`` reproduces the observation (see ``observation_residual``), and about exact
  non-uniqueness only where ``f`` is linear near ``x_hat`` along ``v``.
* ``determined``: none of the above. This is **evidence, not proof**: the counts permit a unique preimage, and the
  Lanczos estimate at ``x_hat`` found no numerically zero singular value in ``k`` steps; a Ritz value overestimates
  the smallest singular value (Krylov methods converge slowly to the small end of a clustered spectrum), so ``J``
  may still be singular or nearly so; local full rank at ``x_hat`` says nothing of a second preimage elsewhere
  (``starts`` looks for one); and where ``x_hat`` does not reproduce the observation, the local evidence is about a
  nearby image, not a preimage. With ``lanczos_iters=0`` it rests on the counts alone.

Tolerances: ``null_tol`` (default ``1e-5``) is relative to the largest Ritz singular value (itself a lower bound on
``sigma_max``, so ``sigma_ratio`` is an upper bound on the true ``sigma_min / sigma_max``); about 100 times float32's
machine epsilon, above the rounding floor of one ``J v`` product and below any conditioning a float32 attack could
exploit. ``box_tol`` (default ``1e-3``) is relative to the box width per channel (``1e-3`` of the ``[0, 1]`` range
is a quarter of an 8-bit level). ``exact_tol`` (default ``1e-4``) and ``spread_tol`` (default ``1e-3``) are as in
:func:`peel_jax.certify_block`.

Measurements (statuses, bounds and singular values on resnet18 and the paper variant): ``benchmarks/RESULTS.md``,
section "Deployed networks".

References: Golub and Kahan, "Calculating the singular values and pseudo-inverse of a matrix", SIAM J. Numer.
Anal. B 2 (1965); Golub and Van Loan, "Matrix Computations", 4th ed., Sec. 10.4; DESIGN.md Sec. 2 (the counts).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from peel_jax import images as _images
from peel_jax._features import features
from peel_jax.models.resnet import stem_max_pool

STATUSES = ("determined", "underdetermined", "not_injective", "locally_underdetermined")


class NetworkCertificate(NamedTuple):
  """Per-image evidence on whether ``observed`` determines the image (leading axis = batch).

  Attributes:
    status: per image, one of :data:`STATUSES` (see the module docstring for what each proves).
    pixels: pixel values per image ``P`` (``H * W * 3``).
    observed_values: observed values per image ``M``.
    nonzero_values: observed values that are not exactly zero.
    informative_values: values that are equations: ``nonzero_values`` behind a ReLU (``gated``), else ``M``.
    null_dim_bound: ``max(0, P - informative_values)``, a lower bound on ``dim null J`` at every exact preimage.
    free_pixels: pixel values of ``x_hat`` not within ``box_tol`` of a box bound.
    free_null_dim_bound: ``max(0, free_pixels - informative_values)``: the same bound over the free pixels.
    path_informative_values: the fewest of ``informative_values`` and, at ``x_hat``, the counts of
      :func:`path_informative_values` (non-zero values; a max-pool's distinct maxima): a bound on ``rank J`` there.
    path_layer: per image, the layer that attains it (``layer`` itself when no earlier one has fewer).
    path_null_dim_bound: ``max(0, P - path_informative_values)`` (at least ``null_dim_bound``), a lower bound on
      ``dim null J`` at ``x_hat``.
    sigma_max: the largest Ritz singular value of ``J`` over the free pixels (a lower bound on the true one).
    sigma_min: ``||J v|| / ||v||`` for the Ritz vector ``v`` of the smallest Ritz value: an upper bound on the true
      smallest singular value over the free pixels.
    sigma_ratio: ``sigma_min / sigma_max``, an upper bound on the true ratio.
    singular_values: ``(N, r)`` the ``r`` smallest Ritz singular values, ascending (the ``i``-th is at least the
      true ``i``-th smallest).
    observation_residual: ``||f(x_hat) - observed|| / ||observed||``: how far ``x_hat`` is from a preimage.
    spread: largest relative distance ``||x_i - x_j|| / ||x_hat||`` between exact preimages from the starts (NaN
      with fewer than two).
    exact_starts: how many of ``x_hat`` and the starts reproduce the observation to ``exact_tol``.
    layer: the observed layer.
    gated: whether a zero observed value is an inequality (the layer is behind a ReLU).
    lanczos_iters: Golub-Kahan-Lanczos steps run.
    null_tol, box_tol, exact_tol, spread_tol: the tolerances used.
    seconds: wall time of the call (the estimate of ``x_hat`` included when it was computed here).
  """

  status: list
  pixels: np.ndarray
  observed_values: np.ndarray
  nonzero_values: np.ndarray
  informative_values: np.ndarray
  null_dim_bound: np.ndarray
  free_pixels: np.ndarray
  free_null_dim_bound: np.ndarray
  path_informative_values: np.ndarray
  path_layer: list
  path_null_dim_bound: np.ndarray
  sigma_max: np.ndarray
  sigma_min: np.ndarray
  sigma_ratio: np.ndarray
  singular_values: np.ndarray
  observation_residual: np.ndarray
  spread: np.ndarray
  exact_starts: np.ndarray
  layer: str
  gated: bool
  lanczos_iters: int
  null_tol: float
  box_tol: float
  exact_tol: float
  spread_tol: float
  seconds: float

  def to_dict(self) -> dict:
    """JSON-ready; per-image fields are lists, or scalars for a batch of one (as the other reports)."""
    out = {}
    for name, value in self._asdict().items():
      if name in ("status", "path_layer"):
        value = list(value)
        out[name] = value[0] if len(value) == 1 else value
      elif isinstance(value, np.ndarray):
        v = [_py(a) for a in value] if value.ndim == 1 else [[_py(b) for b in row] for row in value]
        out[name] = v[0] if len(v) == 1 else v
      else:
        out[name] = value
    return out


def _py(a):
  """A numpy scalar as a JSON-ready Python value (NaN -> None)."""
  a = np.asarray(a).item()
  if isinstance(a, float) and not np.isfinite(a):
    return None if np.isnan(a) else (1e308 if a > 0 else -1e308)
  return a


# --- what is observed ---------------------------------------------------------------------------------------------


def certifiable_layers(model) -> list[str]:
  """Layers :func:`certify_network` accepts: ``'relu'`` (the stem before pooling), ``'maxpool'``, ``'layerK'``,
  ``'layerK.J'`` (the same names as :func:`peel_jax.invert_network`)."""
  names = ["relu", "maxpool"]
  for s, n in enumerate(model.stage_sizes):
    names += [f"layer{s + 1}"] + [f"layer{s + 1}.{b}" for b in range(n)]
  return names


def is_gated(model, layer: str) -> bool:
  """Whether a zero value of ``layer`` says only ``z <= 0``: the layer's last op is a ReLU (or a pool of ReLU
  outputs). False for the paper's block (no post-add activation), pre-activation blocks and injective activations."""
  if model.activation != "relu":
    return False
  if layer in ("relu", "maxpool"):
    return True
  return bool(model.post_activation) and not model.preact


def _layer_fn(model, variables, layer):
  return lambda t: features(model, variables, t, layer)[layer]


_OUT_SHAPES: dict = {}


def _out_shape(model, variables, layer: str, in_shape) -> tuple:
  """The shape of ``layer``'s output for inputs of ``in_shape``, traced once per model, layer, input shape and
  variables' structure (the cache holds shapes only, never the variables)."""
  structure = tuple((jax.tree_util.keystr(p), tuple(np.shape(a)))
                    for p, a in jax.tree_util.tree_leaves_with_path(variables))
  key = (model, layer, tuple(in_shape), structure)
  if key not in _OUT_SHAPES:
    if len(_OUT_SHAPES) >= 256:
      _OUT_SHAPES.clear()
    _OUT_SHAPES[key] = tuple(jax.eval_shape(_layer_fn(model, variables, layer),
                                            jax.ShapeDtypeStruct(tuple(in_shape), jnp.float32)).shape)
  return _OUT_SHAPES[key]


def _image_shape(model, variables, layer: str, obs_shape) -> tuple[int, int, int]:
  """The ``(H, W, 3)`` image whose ``layer`` output has ``obs_shape`` ``(Ho, Wo, C)`` (the even sizes the library's
  inverters produce), or a ValueError."""
  probe = 128
  out = _out_shape(model, variables, layer, (1, probe, probe, 3))
  factor = probe // out[1]
  if len(obs_shape) != 3 or obs_shape[-1] != out[-1]:
    raise ValueError(f"observation of shape {tuple(obs_shape)} does not fit layer {layer!r}: expected "
                     f"(N, H, W, {out[-1]}) or (H, W, {out[-1]}) (the image is about {factor}x larger)")
  shape = (obs_shape[0] * factor, obs_shape[1] * factor, 3)
  got = _out_shape(model, variables, layer, (1, *shape))
  if tuple(got[1:]) != tuple(obs_shape):
    raise ValueError(f"observation of shape {tuple(obs_shape)} does not fit layer {layer!r} for any image size")
  return shape


def informative_values(model, layer: str, observed: jax.Array) -> jax.Array:
  """``(N,)`` int32: per image, the observed values that are equations (the non-zero ones behind a ReLU, every one
  elsewhere; the module docstring). Traceable. The observation cannot determine an image with fewer of them than
  pixel values."""
  flat = observed.reshape(observed.shape[0], -1)
  if is_gated(model, layer):
    return jnp.sum(flat != 0, axis=1, dtype=jnp.int32)
  return jnp.full(flat.shape[:1], flat.shape[1], jnp.int32)


def gated_layers_before(model, layer: str) -> list[str]:
  """The gated layers (:func:`is_gated`) that ``layer``'s output is computed from, in forward order: the stem's
  ``'relu'`` and ``'maxpool'`` and every block ``'layerK.J'`` before ``layer`` (``'layerK'`` is its last block)."""
  order = ["relu", "maxpool"] + model.block_names()
  if layer.startswith("layer") and "." not in layer:
    layer = f"{layer}.{model.stage_sizes[int(layer[5:]) - 1] - 1}"
  return [n for n in order[:order.index(layer)] if is_gated(model, n)]


def path_informative_values(model, variables, layer: str, x: jax.Array) -> tuple[jax.Array, list[str]]:
  """``((N, K) int32, names)``: at ``x``, for each of the ``K`` :func:`gated_layers_before` ``layer`` (and the
  stem's max-pool itself when ``layer`` is it), the number of its values that can vary with the pixels, each a bound
  on the rank of the Jacobian of pixels -> ``layer`` at ``x`` (module docstring): the non-zero values; for a
  max-pool, the positions of its input holding a positive window maximum (:func:`max_pool_sources`). Traceable;
  ``K`` may be 0."""
  max_pooled = model.stem_pool == "max" and is_gated(model, "maxpool")
  names = gated_layers_before(model, layer) + (["maxpool"] if layer == "maxpool" and max_pooled else [])
  if not names:
    return jnp.zeros((x.shape[0], 0), jnp.int32), names
  feats = features(model, variables, x, sorted(set(names) | ({"relu"} if max_pooled else set())))
  counts = [max_pool_sources(feats["relu"]) if n == "maxpool" and max_pooled
            else jnp.sum(feats[n].reshape(x.shape[0], -1) != 0, axis=1, dtype=jnp.int32) for n in names]
  return jnp.stack(counts, axis=1), names


def max_pool_sources(relu_out: jax.Array) -> jax.Array:
  """``(N,) int32``: the positions of the stem's ReLU output ``(N, H, W, C)`` that hold the positive maximum of at
  least one pooling window. Overlapping windows often share their maximum; their rows of the pool's Jacobian are
  then equal, so the rank is at most this count, below the pool's non-zero values. Each window's maximum is found as
  the gradient of the pool's sum (one position per window, the first at a tie)."""
  hits = jax.grad(lambda r: jnp.sum(stem_max_pool(r)))(relu_out)
  return jnp.sum((hits > 0) & (relu_out > 0), axis=(1, 2, 3), dtype=jnp.int32)


def _path_bound(model, variables, layer, x_hat, informative, pixels: int):
  """``(path_informative (N,), path_layer [N], path_null_dim_bound (N,))`` (:class:`NetworkCertificate`)."""
  counts, names = path_informative_values(model, variables, layer, x_hat)
  counts = np.concatenate([np.asarray(counts, np.int64), np.asarray(informative, np.int64)[:, None]], axis=1)
  best = np.argmin(counts, axis=1)  # ties go to the earliest layer
  fewest = counts[np.arange(len(best)), best]
  names = names + [layer]
  return fewest, [names[i] for i in best], np.maximum(0, pixels - fewest)


def _counts(observed: jax.Array, gated: bool, pixels: int):
  """``(observed_values, nonzero_values, informative_values, null_dim_bound)`` per image."""
  n = observed.shape[0]
  flat = np.asarray(observed).reshape(n, -1)
  m = np.full((n,), flat.shape[1], np.int64)
  nz = np.count_nonzero(flat, axis=1).astype(np.int64)
  informative = nz if gated else m
  return m, nz, informative, np.maximum(0, pixels - informative)


def free_pixel_mask(x: jax.Array, box, box_tol: float) -> jax.Array:
  """``True`` where a pixel value of ``x`` (``(N, H, W, 3)``) is farther than ``box_tol * (hi - lo)`` from both box
  bounds (all ``True`` without a box)."""
  if box is None:
    return jnp.ones(x.shape, bool)
  if isinstance(box, str):
    if box != "imagenet":
      raise ValueError(f"unknown box {box!r}; pass 'imagenet', None or (lo, hi)")
    box = _images.pixel_box()
  lo, hi = (jnp.broadcast_to(jnp.asarray(b, x.dtype), x.shape) for b in box)
  tol = box_tol * (hi - lo)
  return (x > lo + tol) & (x < hi - tol)


# --- local singular values: Golub-Kahan-Lanczos ---------------------------------------------------------------------


def _per_image_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)


def _expand(s: jax.Array, ndim: int) -> jax.Array:
  """``(N,)`` -> ``(N, 1, ..., 1)`` with ``ndim`` axes in all (explicit broadcasting)."""
  return s.reshape(s.shape + (1,) * (ndim - s.ndim))


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def _linearize_network(model, variables, layer, x):
  """``(f(x), pullback)`` of the network up to ``layer``; the pullback is a pytree, so it can be passed into the
  jitted products below."""
  return jax.vjp(_layer_fn(model, variables, layer), x)


@jax.jit
def _pull(vjp, u, mask):
  """``P J^T u`` per image (``P`` zeroes the held pixels)."""
  return vjp(u)[0] * mask


@jax.jit
def _push(vjp, v, y):
  """``J v`` per image: the transpose of the pullback (:func:`jax.linear_transpose`)."""
  return jax.linear_transpose(vjp, y)((v,))[0]


@jax.jit
def _orthogonalize(basis, w):
  """``w`` (``(N, ...)``) orthogonalised against the rows of ``basis`` (``(K, N, ...)``, unused rows zero), per
  image, by classical Gram-Schmidt twice ("twice is enough"); returns ``(w, ||w||)``."""
  b = basis.reshape(basis.shape[0], w.shape[0], -1)
  flat = w.reshape(w.shape[0], -1)
  for _ in range(2):
    c = jnp.einsum("knd,nd->kn", b, flat, precision=jax.lax.Precision.HIGHEST)
    flat = flat - jnp.einsum("kn,knd->nd", c, b, precision=jax.lax.Precision.HIGHEST)
  return flat.reshape(w.shape), jnp.sqrt(jnp.sum(flat * flat, axis=1))


def _next_vector(basis, w, key, mask, scale, tiny):
  """The next Lanczos vector: ``w`` orthogonalised against ``basis`` and normalised; returns ``(q, ||w||)``.

  Where ``||w|| <= tiny * scale`` (breakdown: an invariant subspace was found) a random unit vector orthogonal to
  ``basis`` replaces the direction and the coefficient ``||w||`` (about zero) is kept, so ``J V = U B`` still holds.
  """
  w, norm = _orthogonalize(basis, w)
  broke = np.asarray(norm <= tiny * scale)
  if broke.any():
    r, rn = _orthogonalize(basis, jax.random.normal(key, w.shape, w.dtype) * mask)
    w = jnp.where(_expand(jnp.asarray(broke), w.ndim), r / _expand(jnp.maximum(rn, 1e-30), w.ndim), w)
    return w, norm
  return w / _expand(jnp.maximum(norm, 1e-30), w.ndim), norm


@functools.partial(jax.jit, donate_argnums=0)
def _store(basis, j, q):
  """``basis`` with row ``j`` set to ``q``, in place (the buffer is donated)."""
  return jax.lax.dynamic_update_index_in_dim(basis, q, j, 0)


def _bidiagonalize(vjp, y, mask, v1, key, iters: int, tiny: float):
  """``iters`` Golub-Kahan-Lanczos steps from ``v1`` with full reorthogonalisation on both sides, batched.

  Returns ``(alphas (k, N), betas (k - 1, N), V (k, N, ...))`` with ``J V_k = U_k B_k``, ``B_k`` upper bidiagonal
  (diagonal ``alphas``, superdiagonal ``betas``).
  """
  n = v1.shape[0]
  vs = _store(jnp.zeros((iters + 1, *v1.shape), v1.dtype), 0, v1)
  us = jnp.zeros((iters, *y.shape), y.dtype)
  ones = jnp.ones(y.shape, y.dtype)
  scale = jnp.zeros((n,), y.dtype)
  u, alpha = _next_vector(us, _push(vjp, v1, y), jax.random.fold_in(key, 0), ones, scale, tiny)
  scale = jnp.maximum(scale, alpha)
  us = _store(us, 0, u)
  alphas, betas = [alpha], []
  for j in range(1, iters):
    v, beta = _next_vector(vs, _pull(vjp, u, mask), jax.random.fold_in(key, 2 * j - 1), mask, scale, tiny)
    scale = jnp.maximum(scale, beta)
    vs = _store(vs, j, v)
    u, alpha = _next_vector(us, _push(vjp, v, y), jax.random.fold_in(key, 2 * j), ones, scale, tiny)
    scale = jnp.maximum(scale, alpha)
    us = _store(us, j, u)
    alphas.append(alpha)
    betas.append(beta)
  betas = jnp.stack(betas) if betas else jnp.zeros((0, n), y.dtype)
  return jnp.stack(alphas), betas, vs[:iters]


def jacobian_singular_values(fn: Callable, x: jax.Array, mask: jax.Array | None = None, *, key: jax.Array | None = None,
                             iters: int = 32, n_values: int = 4, tiny: float = 1e-6) -> dict:
  """Matrix-free estimates of the extreme singular values of the Jacobian of ``fn`` at each image of ``x``.

  ``fn`` maps a batch ``(N, ...)`` to a batch and treats images independently (a network in inference mode), so
  its Jacobian is block diagonal and one batched product serves every image. Golub-Kahan-Lanczos bidiagonalisation
  (see the module docstring), restricted to the coordinates where ``mask`` is true, from a random start.

  Args:
    fn: the map, batched (it is jitted once per call).
    x: ``(N, ...)`` where to linearise.
    mask: ``(N, ...)`` boolean, the free coordinates (``None``: all).
    key: PRNG key of the start (and of breakdown replacements).
    iters: Lanczos steps ``k`` (capped at the number of free coordinates and of outputs per image).
    n_values: how many of the smallest Ritz singular values to return.
    tiny: breakdown threshold, relative to the largest coefficient seen so far.

  Returns:
    ``{'sigma_max' (N,), 'sigma_min' (N,), 'ritz' (N, n_values) ascending, 'iters' int}``: ``sigma_max`` the largest
    Ritz singular value (at most the true largest), ``ritz`` the smallest ones (the ``i``-th at least the true
    ``i``-th smallest), ``sigma_min`` ``||J v|| / ||v||`` for the Ritz vector ``v`` of the smallest Ritz value,
    recomputed directly (an upper bound on the true smallest singular value, converged or not).
  """
  y, vjp = jax.vjp(jax.jit(fn), x)
  return _singular_values(y, vjp, x, mask, key=key, iters=iters, n_values=n_values, tiny=tiny)


def _singular_values(y, vjp, x, mask, *, key, iters: int, n_values: int, tiny: float) -> dict:
  """:func:`jacobian_singular_values` from a linearisation ``(y, vjp)`` at ``x``."""
  key = jax.random.key(0) if key is None else key
  mask = jnp.ones(x.shape, x.dtype) if mask is None else jnp.asarray(mask).astype(x.dtype)
  n = x.shape[0]
  free = int(np.min(np.asarray(jnp.sum(mask.reshape(n, -1), axis=1))))
  k = max(1, min(iters, free, int(np.prod(y.shape[1:]))))
  k_start, k_run = jax.random.split(key)
  v1 = jax.random.normal(k_start, x.shape, x.dtype) * mask
  v1 = v1 / _expand(jnp.sqrt(jnp.maximum(_per_image_dot(v1, v1), 1e-30)), x.ndim)
  alphas, betas, vs = _bidiagonalize(vjp, y, mask, v1, k_run, k, tiny)
  alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
  ritz, coeffs = [], []
  for i in range(n):
    b = np.diag(alphas[:, i]) + np.diag(betas[:, i], 1)
    _, s, rt = np.linalg.svd(b)  # descending
    ritz.append(s[::-1])
    coeffs.append(rt[-1])
  ritz = np.stack(ritz)
  c = jnp.asarray(np.stack(coeffs, 1), x.dtype)  # (k, N)
  v = jnp.sum(_expand(c, vs.ndim) * vs, axis=0)
  jv = _push(vjp, v, y)
  sigma_min = np.sqrt(np.asarray(_per_image_dot(jv, jv), np.float64) /
                      np.maximum(np.asarray(_per_image_dot(v, v), np.float64), 1e-300))
  r = min(n_values, k)
  return {"sigma_max": ritz[:, -1], "sigma_min": sigma_min, "ritz": ritz[:, :r], "iters": k}


# --- several starts -----------------------------------------------------------------------------------------------


def _observation_residual(model, variables, layer, x, observed) -> np.ndarray:
  from peel_jax.solver.info import relative_error

  return np.asarray(relative_error(_observe(model, variables, layer, x), observed))


@functools.partial(jax.jit, static_argnames=("model", "layer"))
def _observe(model, variables, layer, x):
  return features(model, variables, x, layer)[layer]


def preimage_spread(model, variables, observed, layer, x_hat, box, *, key, starts: int, start_scale: float,
                    refine_iters: int, exact_tol: float, solver_config=None):
  """Exact preimages from ``starts`` perturbed starts, and how far apart they are.

  Start ``i``: ``x0 = clip(x_hat + start_scale * rms(x_hat) * N(0, I), box)``, refined by the prior-free projected
  Levenberg-Marquardt on ``||f(x) - observed||^2`` (``refine_image``, ``refine_iters`` iterations). A start (and
  ``x_hat`` itself) counts as exact when its relative observation residual is at most ``exact_tol``.

  Returns:
    ``(spread (N,), exact (N,))``: the largest ``||x_i - x_j|| / ||x_hat||`` over pairs of exact preimages (NaN with
    fewer than two), and how many were exact.
  """
  try:  # lazily: the attack's modules import much; the refinement moved in the solver-engine refactor
    from peel_jax.problems.refine import refine_image
  except ImportError:
    from peel_jax._invert_network import refine_image

  n = x_hat.shape[0]
  box_full = None if box is None else tuple(jnp.broadcast_to(jnp.asarray(b, x_hat.dtype), x_hat.shape[1:])
                                            for b in box)
  sols = [np.asarray(x_hat)]
  oks = [_observation_residual(model, variables, layer, x_hat, observed) <= exact_tol]
  rms = jnp.sqrt(jnp.mean(x_hat ** 2, axis=(1, 2, 3)))
  for k in jax.random.split(key, starts):
    x0 = x_hat + start_scale * _expand(rms, 4) * jax.random.normal(k, x_hat.shape, x_hat.dtype)
    if box_full is not None:
      x0 = jnp.clip(x0, box_full[0][None], box_full[1][None])
    kwargs = {} if solver_config is None else {"config": solver_config}
    xs, _ = refine_image(model, variables, layer, observed, x0, box=box_full, iters=refine_iters, **kwargs)
    sols.append(np.asarray(xs))
    oks.append(_observation_residual(model, variables, layer, xs, observed) <= exact_tol)
  sols, oks = np.stack(sols), np.stack(oks)
  norm = np.sqrt(np.sum(np.asarray(x_hat, np.float64).reshape(n, -1) ** 2, 1)) + 1e-30
  spread = np.full((n,), np.nan)
  for i in range(n):
    good = sols[oks[:, i], i].reshape(int(oks[:, i].sum()), -1).astype(np.float64)
    if len(good) >= 2:
      spread[i] = np.sqrt(((good[:, None] - good[None]) ** 2).sum(-1)).max() / norm[i]
  return spread, oks.sum(0)


# --- the certificate ----------------------------------------------------------------------------------------------


def _status(null_bound, path_bound, spread, ratio, spread_tol, null_tol) -> list:
  out = []
  for i in range(len(null_bound)):
    if null_bound[i] > 0:
      out.append("underdetermined")
    elif np.isfinite(spread[i]) and spread[i] > spread_tol:
      out.append("not_injective")
    elif path_bound[i] > 0 or ratio[i] <= null_tol:
      out.append("locally_underdetermined")
    else:
      out.append("determined")
  return out


def _resolve_box(box):
  if box is None:
    return None
  if isinstance(box, str):
    if box != "imagenet":
      raise ValueError(f"unknown box {box!r}; pass 'imagenet', None or (lo, hi)")
    return _images.pixel_box()
  return box


def _prepare(model, variables, observed, layer, x_hat, network_config):
  """Validates the inputs; returns ``(observed (N, ...), x_hat (N, H, W, 3), batched)``, estimating ``x_hat`` with
  :func:`peel_jax.invert_network` when it is ``None``."""
  valid = certifiable_layers(model)
  if layer not in valid:
    raise KeyError(f"cannot certify layer {layer!r}; valid layers: {', '.join(valid)}")
  observed = jnp.asarray(observed)
  if observed.ndim not in (3, 4):
    raise ValueError(f"observation of shape {tuple(observed.shape)} does not fit layer {layer!r}: expected "
                     "(N, H, W, C) or (H, W, C)")
  batched = observed.ndim == 4
  if not batched:
    observed = observed[None]
  shape = _image_shape(model, variables, layer, observed.shape[1:])
  if x_hat is None:
    from peel_jax import invert_network  # lazily: the attack imports much

    kwargs = {} if network_config is None else {"config": network_config}
    x_hat, _ = invert_network(model, variables, observed, layer, **kwargs)
  x_hat = jnp.asarray(x_hat, jnp.float32)
  if x_hat.ndim == 3:
    x_hat = x_hat[None]
  if x_hat.ndim != 4 or x_hat.shape[0] != observed.shape[0] or x_hat.shape[-1] != 3:
    raise ValueError(f"x_hat of shape {tuple(x_hat.shape)} does not fit the observation: expected "
                     f"({observed.shape[0]}, H, W, 3), e.g. {(observed.shape[0], *shape)}")
  got = _out_shape(model, variables, layer, (1, *x_hat.shape[1:]))
  if tuple(got[1:]) != tuple(observed.shape[1:]):
    raise ValueError(f"x_hat of shape {tuple(x_hat.shape)} gives {layer!r} outputs of shape {tuple(got[1:])} per "
                     f"image, not the observation's {tuple(observed.shape[1:])}; expected images of shape "
                     f"{(observed.shape[0], *shape)}")
  return observed, x_hat, batched


def _network_singular_values(model, variables, layer, x_hat, mask, key, iters: int, n_values: int) -> dict:
  """:func:`jacobian_singular_values` of the network up to ``layer`` (NaN, counts only, when ``iters`` is 0)."""
  if iters == 0:
    nan = np.full((x_hat.shape[0],), np.nan)
    return {"sigma_max": nan, "sigma_min": nan, "ritz": np.full((x_hat.shape[0], 0), np.nan), "iters": 0}
  y, vjp = _linearize_network(model, variables, layer, x_hat)
  return _singular_values(y, vjp, x_hat, mask, key=key, iters=iters, n_values=n_values, tiny=1e-6)


def certify_network(
    model,
    variables,
    observed: jax.Array,
    layer: str,
    x_hat: jax.Array | None = None,
    *,
    key: jax.Array | None = None,
    box: Any = "imagenet",
    lanczos_iters: int = 32,
    n_values: int = 4,
    null_tol: float = 1e-5,
    box_tol: float = 1e-3,
    starts: int = 0,
    start_scale: float = 0.1,
    refine_iters: int = 20,
    exact_tol: float = 1e-4,
    spread_tol: float = 1e-3,
    solver_config=None,
    network_config=None,
) -> NetworkCertificate:
  """Whether each observation determines its image: counts, local singular values, and optional starts.

  The network-level counterpart of :func:`peel_jax.certify_block`; see the module docstring for the math, the
  tolerances and what each status proves and does not prove.

  Args:
    model: a :class:`peel_jax.models.ResNet`.
    variables: its Flax variables.
    observed: the output of ``layer``, ``(N, Ho, Wo, C)`` (one image ``(Ho, Wo, C)`` is accepted).
    layer: one of :func:`certifiable_layers` (``'maxpool'``, ``'layer2'``, ``'layer3.1'`` ...).
    x_hat: where to linearise: normalised images ``(N, H, W, 3)`` (the truth, to measure; an estimate, to attack).
      ``None``: ``peel_jax.invert_network(model, variables, observed, layer)``.
    key: PRNG key of the Lanczos start and the random starts.
    box: the pixel box: ``'imagenet'`` (:func:`peel_jax.images.pixel_box`), ``None`` or ``(lo, hi)``.
    lanczos_iters: Golub-Kahan-Lanczos steps ``k`` (each one ``J v`` and one ``J^T u``); 0 skips the estimate
      (counts only: the singular values are NaN, and ``determined`` then rests on the counts alone).
    n_values: how many of the smallest Ritz singular values to report.
    null_tol: a singular value at most ``null_tol * sigma_max`` is numerically zero.
    box_tol: a pixel within ``box_tol * (hi - lo)`` of a bound is held there.
    starts: random starts for the spread of exact preimages (0: none).
    start_scale, refine_iters: each start's noise (relative to ``rms(x_hat)``) and its refinement budget.
    exact_tol: a relative observation residual at most this counts as an exact preimage.
    spread_tol: exact preimages farther apart than this (relative to ``||x_hat||``) are different.
    solver_config: :class:`peel_jax.SolverConfig` of the starts' refinement (default ``SolverConfig()``).
    network_config: when ``x_hat`` is ``None``, passed to :func:`peel_jax.invert_network` as ``config=``.

  Returns:
    A :class:`NetworkCertificate` (scalars in :meth:`~NetworkCertificate.to_dict` for a batch of one).

  Raises:
    KeyError: an unknown ``layer`` (the message lists the valid ones).
    ValueError: an observation whose shape fits ``layer`` for no image size, an ``x_hat`` of the wrong shape, a bad
      box or option.
  """
  t0 = time.perf_counter()
  if lanczos_iters < 0 or n_values < 1 or starts < 0:
    raise ValueError(f"need lanczos_iters >= 0, n_values >= 1, starts >= 0; got {lanczos_iters}, {n_values}, "
                     f"{starts}")
  box = _resolve_box(box)
  observed, x_hat, _ = _prepare(model, variables, observed, layer, x_hat, network_config)
  key = jax.random.key(0) if key is None else key
  k_lanczos, k_starts = jax.random.split(key)
  n = observed.shape[0]
  pixels = int(np.prod(x_hat.shape[1:]))
  gated = is_gated(model, layer)
  m, nz, informative, null_bound = _counts(observed, gated, pixels)
  path_informative, path_layer, path_bound = _path_bound(model, variables, layer, x_hat, informative, pixels)
  mask = free_pixel_mask(x_hat, box, box_tol)
  free = np.asarray(jnp.sum(mask.reshape(n, -1), axis=1)).astype(np.int64)
  sv = _network_singular_values(model, variables, layer, x_hat, mask, k_lanczos, lanczos_iters, n_values)
  ratio = sv["sigma_min"] / np.maximum(sv["sigma_max"], 1e-300)
  obs_res = _observation_residual(model, variables, layer, x_hat, observed)
  spread, exact = np.full((n,), np.nan), (obs_res <= exact_tol).astype(np.int64)
  if starts > 0:
    spread, exact = preimage_spread(model, variables, observed, layer, x_hat, box, key=k_starts, starts=starts,
                                    start_scale=start_scale, refine_iters=refine_iters, exact_tol=exact_tol,
                                    solver_config=solver_config)
  return NetworkCertificate(
      status=_status(null_bound, path_bound, spread, ratio, spread_tol, null_tol),
      pixels=np.full((n,), pixels, np.int64),
      observed_values=m, nonzero_values=nz, informative_values=informative, null_dim_bound=null_bound,
      free_pixels=free, free_null_dim_bound=np.maximum(0, free - informative),
      path_informative_values=path_informative, path_layer=path_layer, path_null_dim_bound=path_bound,
      sigma_max=sv["sigma_max"],
      sigma_min=sv["sigma_min"], sigma_ratio=ratio, singular_values=sv["ritz"], observation_residual=obs_res,
      spread=spread, exact_starts=np.asarray(exact, np.int64), layer=layer, gated=gated,
      lanczos_iters=sv["iters"], null_tol=null_tol, box_tol=box_tol, exact_tol=exact_tol, spread_tol=spread_tol,
      seconds=time.perf_counter() - t0)
