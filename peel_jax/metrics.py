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
