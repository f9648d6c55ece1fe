"""Image quality of a reconstruction: MSE, PSNR and SSIM on de-normalised ``[0, 1]`` images.

Every function takes images as NumPy/JAX arrays, channels last, either one image ``(H, W, C)`` or a batch
``(N, H, W, C)``, with values in ``[0, 1]`` (de-normalise network inputs first with
:func:`peel_jax.images.denormalize`; values outside ``[0, 1]`` are clipped, as an image file would be). Batched
inputs return one value per image; single images return a Python float.

SSIM is the standard Gaussian-window SSIM of Wang, Bovik, Sheikh and Simoncelli, "Image Quality Assessment: From
Error Visibility to Structural Similarity", IEEE TIP 2004: an 11x11 Gaussian window (sigma 1.5), ``K1 = 0.01``,
``K2 = 0.03``, population (not sample) covariances, computed per channel and averaged. Boundaries are handled as
scikit-image does (mirror padding, then the 5-pixel border of the SSIM map is left out of the mean), so the value
equals ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`` (tested). Computed in float64 with NumPy: metrics are host-side.
"""

from __future__ import annotations

import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # 11x11 window: int(3.5 * sigma + 0.5), scikit-image's truncation
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _prepare(a, b):
  a = np.clip(np.asarray(a, np.float64), 0.0, 1.0)
  b = np.clip(np.asarray(b, np.float64), 0.0, 1.0)
  if a.shape != b.shape:
    raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
  if a.ndim not in (3, 4):
    raise ValueError(f"expected (H, W, C) or (N, H, W, C) images, got shape {a.shape}")
  batched = a.ndim == 4
  if not batched:
    a, b = a[None], b[None]
  return a, b, batched


def _out(v: np.ndarray, batched: bool):
  return v if batched else float(v[0])


def mse(a, b):
  """Mean squared error per image (both images in ``[0, 1]``)."""
  a, b, batched = _prepare(a, b)
  return _out(np.mean((a - b) ** 2, axis=(1, 2, 3)), batched)


def psnr(a, b, data_range: float = 1.0):
  """Peak signal-to-noise ratio in dB per image, ``10 log10(data_range^2 / MSE)`` (``inf`` for identical images)."""
  m = np.atleast_1d(np.asarray(mse(a, b), np.float64))
  with np.errstate(divide="ignore"):
    out = 10.0 * np.log10(data_range**2 / m)
  return out if np.ndim(a) == 4 else float(out[0])


def _gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> np.ndarray:
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (t / sigma) ** 2)
  return w / w.sum()


def _filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Separable filter of ``x`` ``(N, H, W, C)`` along H and W with mirror padding (scipy's ``'reflect'``)."""
  r = (len(w) - 1) // 2
  x = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")
  h, wd = x.shape[1] - 2 * r, x.shape[2] - 2 * r
  out = sum(w[k] * x[:, k:k + h] for k in range(len(w)))
  return sum(w[k] * out[:, :, k:k + wd] for k in range(len(w)))


def ssim_map(a, b) -> np.ndarray:
  """The SSIM map ``(N, H, W, C)`` of batches ``a``, ``b`` in ``[0, 1]`` (see the module docstring)."""
  a, b, _ = _prepare(a, b)
  w = _gaussian_window()
  c1, c2 = (SSIM_K1 * 1.0) ** 2, (SSIM_K2 * 1.0) ** 2
  mu_a, mu_b = _filter(a, w), _filter(b, w)
  var_a = _filter(a * a, w) - mu_a**2
  var_b = _filter(b * b, w) - mu_b**2
  cov = _filter(a * b, w) - mu_a * mu_b
  num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
  den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
  return num / den


def ssim(a, b):
  """Mean SSIM per image: the SSIM map without its 5-pixel border, averaged over pixels and channels."""
  a, b, batched = _prepare(a, b)
  if min(a.shape[1], a.shape[2]) < 2 * SSIM_RADIUS + 1:
    raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1}, got {a.shape[1:3]}")
  s = ssim_map(a, b)
  r = SSIM_RADIUS
  return _out(s[:, r:-r, r:-r, :].mean(axis=(1, 2, 3)), batched)


def image_metrics(reconstruction, original) -> dict:
  """``{'mse', 'psnr', 'ssim'}``, each an array with one value per image (batched ``[0, 1]`` images)."""
  return {"mse": mse(reconstruction, original), "psnr": psnr(reconstruction, original),
          "ssim": ssim(reconstruction, original)}


# --- model-inversion privacy metrics ------------------------------------------------------------------------------
#
# The model-inversion literature scores a reconstruction by what an *evaluation network* (a classifier other than
# the attacked one, or the attacked one itself) makes of it: Zhang et al., "The Secret Revealer: Generative
# Model-Inversion Attacks Against Deep Neural Networks", CVPR 2020 (attack accuracy, KNN distance), and the works
# that follow it (Chen et al. KED-MI, CVPR 2021; Struppek et al. PPA, ICML 2022).

_KNN_CHUNK_ELEMENTS = 1 << 24  # float64 differences held at once by knn_distance (128 MiB)


def _as_labels(labels, n: int, what: str) -> np.ndarray:
  a = np.asarray(labels)
  if a.ndim != 1 or a.shape[0] != n:
    raise ValueError(f"{what} must be a vector of {n} labels, got shape {a.shape}")
  if a.size and not np.issubdtype(a.dtype, np.integer):
    if not (np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a))):
      raise ValueError(f"{what} must be integer class labels, got dtype {a.dtype}")
    a = a.astype(np.int64)
  return a


def knn_distance(recon_features, private_features, recon_labels, private_labels) -> np.ndarray:
  """Squared L2 distance from each reconstruction to the nearest private image of its own class, in feature space.

  ``d_i = min_{j : private_labels[j] == recon_labels[i]} || f(x_hat_i) - f(x_j) ||^2``, the "KNN Dist" of Zhang et
  al. (CVPR 2020): features are an evaluation network's penultimate layer (see :func:`evaluation_embeddings`), the
  private set is the target class's training images. Lower is a closer (more revealing) reconstruction. Computed
  exactly (differences, not the ``|a|^2 + |b|^2 - 2 a.b`` expansion) in float64, a chunk of reconstructions at a
  time, so identical features give exactly 0.

  Args:
    recon_features: ``(N, D)`` features of the reconstructions.
    private_features: ``(M, D)`` features of the private images.
    recon_labels: ``(N,)`` int, the class/identity each reconstruction was meant to reveal.
    private_labels: ``(M,)`` int, each private image's class.

  Returns:
    ``(N,)`` float64 squared distances.

  Raises:
    ValueError: mismatched shapes, non-integer labels, or a reconstruction whose class has no private image (the
      message names the label(s)).
  """
  r = np.asarray(recon_features, np.float64)
  p = np.asarray(private_features, np.float64)
  if r.ndim != 2 or p.ndim != 2:
    raise ValueError(f"features must be (N, D) and (M, D) arrays, got shapes {r.shape} and {p.shape}")
  if r.shape[1] != p.shape[1]:
    raise ValueError(f"feature dimensions differ: {r.shape[1]} (reconstructions) vs {p.shape[1]} (private)")
  rl = _as_labels(recon_labels, r.shape[0], "recon_labels")
  pl = _as_labels(private_labels, p.shape[0], "private_labels")
  missing = sorted(set(rl.tolist()) - set(pl.tolist()))
  if missing:
    raise ValueError(f"no private image of label(s) {missing}: the KNN distance of a reconstruction needs at least "
                     f"one private image of its class")
  out = np.empty(r.shape[0], np.float64)
  for label in np.unique(rl):
    rows = np.flatnonzero(rl == label)
    priv = p[pl == label]
    step = max(1, _KNN_CHUNK_ELEMENTS // max(1, priv.size))
    for s in range(0, rows.size, step):
      idx = rows[s:s + step]
      d = r[idx, None, :] - priv[None, :, :]
      out[idx] = np.min(np.sum(d * d, axis=2), axis=1)
  return out


def attack_accuracy(original_logits, recon_logits, k=(1, 5)) -> dict:
  """How often the evaluation network classifies a reconstruction as it classifies the original.

  Top-``k`` agreement of image ``i``: the original's top-1 class ``argmax original_logits[i]`` is among the ``k``
  largest of ``recon_logits[i]``; for ``k = 1`` that is ``argmax`` equality (ties go to the lowest class index, as
  ``np.argmax``). This is the "attack accuracy" of Zhang et al. (CVPR 2020) with the original's prediction standing
  in for its label (pass one-hot ``original_logits`` to score against true labels instead).

  ``k`` larger than the number of classes ``C`` is clamped to ``C`` (every image then agrees); the key keeps the
  requested ``k`` (``'top5'`` for a 3-class problem means top-3).

  Args:
    original_logits: ``(N, C)`` logits (or any scores) of the originals.
    recon_logits: ``(N, C)`` logits of the reconstructions.
    k: an int or a sequence of ints ``>= 1``.

  Returns:
    ``{'top{k}': float, 'top{k}_per_image': (N,) bool array}`` for every requested ``k`` (the fraction is
    ``nan`` for ``N = 0``).

  Raises:
    ValueError: mismatched or non-2D logits, or a ``k`` below 1.
  """
  o = np.asarray(original_logits)
  r = np.asarray(recon_logits)
  if o.ndim != 2 or o.shape != r.shape:
    raise ValueError(f"logits must be two (N, C) arrays of one shape, got {o.shape} and {r.shape}")
  if o.shape[1] < 1:
    raise ValueError("logits need at least one class")
  ks = (k,) if np.ndim(k) == 0 else tuple(k)
  for kk in ks:
    if int(kk) != kk or kk < 1:
      raise ValueError(f"k must be integers >= 1, got {k!r}")
  target = np.argmax(o, axis=1)
  order = np.argsort(-r, axis=1, kind="stable")  # classes by decreasing recon logit, ties by index
  rank = np.argmax(order == target[:, None], axis=1)  # position of the original's class in that order
  out = {}
  for kk in ks:
    hit = rank < min(int(kk), o.shape[1])
    out[f"top{int(kk)}"] = float(np.mean(hit)) if hit.size else float("nan")
    out[f"top{int(kk)}_per_image"] = hit
  return out


def evaluation_embeddings(model, variables, images, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Features and logits of an evaluation network: ``(features (N, D), logits (N, K))``, float32 NumPy.

  ``features`` is the ``avgpool`` output flattened (the penultimate layer, ``D = 512`` for resnet18/34, 2048 for
  the bottleneck ResNets), ``logits`` the ``fc`` output, both from :func:`peel_jax.features`. Runs jitted chunks of
  ``batch_size`` images (the last one padded, so one program serves every chunk) to bound memory.

  Args:
    model: a :class:`peel_jax.models.ResNet`.
    variables: its Flax variables.
    images: ImageNet-normalised images ``(N, H, W, 3)`` (use :func:`peel_jax.images.normalize` on ``[0, 1]``
      images).
    batch_size: images per chunk.
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f"images must be a batch (N, H, W, C), got shape {x.shape}")
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  n = x.shape[0]
  b = min(int(batch_size), max(n, 1))
  f = _embedding_fn()
  feats, logits = [], []
  for s in range(0, n, b):
    chunk = x[s:s + b]
    m = chunk.shape[0]
    if m < b:
      chunk = np.concatenate([chunk, np.zeros((b - m, *x.shape[1:]), np.float32)])
    fe, lo = f(model, variables, chunk)
    feats.append(np.asarray(fe)[:m])
    logits.append(np.asarray(lo)[:m])
  if not feats:
    import jax

    shape = jax.eval_shape(lambda v, t: f(model, v, t), variables, np.zeros((1, *x.shape[1:]), np.float32))
    return (np.zeros((0, *shape[0].shape[1:]), np.float32), np.zeros((0, *shape[1].shape[1:]), np.float32))
  return np.concatenate(feats), np.concatenate(logits)


_EMBED = []


def _embedding_fn():
  """The jitted ``(model, variables, x) -> (flattened avgpool, fc)`` (built on first use: this module stays
  importable without tracing anything)."""
  if not _EMBED:
    import jax

    from peel_jax._features import features

    def embed(model, variables, x):
      out = features(model, variables, x, ("avgpool", "fc"))
      return out["avgpool"].reshape(x.shape[0], -1), out["fc"]

    _EMBED.append(jax.jit(embed, static_argnums=0))
  return _EMBED[0]
