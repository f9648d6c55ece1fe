"""Images in and out of the network: load a file or a bundled photo, resize, ImageNet-normalise, and back.

Network inputs are ImageNet-normalised, channels last: ``x = (img - IMAGENET_MEAN) / IMAGENET_STD`` with ``img`` in
``[0, 1]`` (the constants live in :mod:`peel_jax.zoo`). The valid pixel range ``[0, 1]`` therefore becomes the
per-channel box ``[pixel_box()]`` in normalised units, which the stem inversion uses as bounds.

Bundled photos (shipped inside installed wheels; nothing is downloaded): scikit-image's ``astronaut``, ``chelsea``,
``coffee`` and ``lfw:K`` (face ``K`` of ``skimage.data.lfw_subset()``, 25x25 greyscale, replicated to RGB), and
matplotlib's ``grace_hopper`` (a 512x600 portrait). Every loader centre-crops to a square before resizing (the
networks take square inputs here; cropping keeps the aspect ratio of what is left).
"""

from __future__ import annotations

import os

import numpy as np

from peel_jax import zoo
from peel_jax.zoo import IMAGENET_MEAN, IMAGENET_STD

BUNDLED = ("astronaut", "chelsea", "coffee", "grace_hopper", "lfw")


class ImageError(ValueError):
  """An image that cannot be read or used."""


def _square(img: np.ndarray) -> np.ndarray:
  h, w = img.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return img[top:top + s, left:left + s]


def _to_rgb01(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype == np.uint8:
    img = img.astype(np.float32) / 255.0
  elif img.dtype == np.uint16:
    img = img.astype(np.float32) / 65535.0
  img = np.asarray(img, np.float32)
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  if img.ndim != 3:
    raise ImageError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
  if img.shape[-1] == 4:
    img = img[..., :3]
  if img.shape[-1] == 1:
    img = np.repeat(img, 3, axis=-1)
  if img.shape[-1] != 3:
    raise ImageError(f"expected 1, 3 or 4 channels, got {img.shape[-1]}")
  return np.clip(img, 0.0, 1.0)


def resize(img: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops ``img`` (``(H, W, 3)`` in ``[0, 1]``) to a square and resizes it to ``size`` x ``size``."""
  from skimage import transform

  if size < 1:
    raise ImageError(f"size must be positive, got {size}")
  img = _square(img)
  if img.shape[0] == size:
    return np.ascontiguousarray(img, np.float32)
  out = transform.resize(img, (size, size), anti_aliasing=img.shape[0] > size, preserve_range=True)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def bundled(name: str, size: int | None = None) -> np.ndarray:
  """A bundled photo (see :data:`BUNDLED`; ``'lfw:K'`` picks face ``K``, ``'lfw'`` is ``'lfw:0'``) in ``[0, 1]``.

  Returns ``(H, W, 3)`` float32, resized to ``size`` x ``size`` (centre-cropped) when ``size`` is given.
  """
  base, _, index = name.partition(":")
  if base not in BUNDLED:
    raise ImageError(f"unknown bundled image {name!r}; expected one of {', '.join(BUNDLED)} (lfw:K for face K)")
  if base == "grace_hopper":
    from matplotlib import cbook

    img = load_file(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
  else:
    from skimage import data

    if base == "lfw":
      faces = data.lfw_subset()
      try:
        k = int(index or 0)
        img = faces[k]
      except (ValueError, IndexError):
        raise ImageError(f"bad lfw face index {index!r}; expected 0..{len(faces) - 1}") from None
    else:
      img = getattr(data, base)()
    img = _to_rgb01(img)
  return img if size is None else resize(img, size)


def load_file(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
  """Reads an image file with Pillow as ``(H, W, 3)`` float32 in ``[0, 1]`` (resized when ``size`` is given).

  Raises:
    ImageError: the file is missing or is not an image Pillow can decode.
  """
  from PIL import Image, UnidentifiedImageError

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageError(f"image file not found: {path}")
  try:
    with Image.open(path) as im:
      im.load()
      img = np.asarray(im.convert("RGB"))
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise ImageError(f"cannot read {path!r} as an image: {e}") from None
  img = _to_rgb01(img)
  return img if size is None else resize(img, size)


def load(source: str | os.PathLike, size: int | None = None) -> np.ndarray:
  """An image file path, or the name of a bundled photo (when no such file exists), in ``[0, 1]``."""
  s = os.fspath(source)
  if os.path.exists(s) or s.partition(":")[0] not in BUNDLED:
    return load_file(s, size)
  return bundled(s, size)


def normalize(img) -> np.ndarray:
  """ImageNet mean/std normalisation of ``[0, 1]`` images, channels last (any leading shape)."""
  return zoo.normalize(np.asarray(img, np.float32))


def denormalize(x) -> np.ndarray:
  """Inverse of :func:`normalize`, clipped to ``[0, 1]`` (what an image file can hold)."""
  x = np.asarray(x, np.float32)
  return np.clip(x * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def pixel_box() -> tuple[np.ndarray, np.ndarray]:
  """``(lo, hi)``, per channel ``(3,)``: the normalised values of pixel 0 and pixel 1."""
  return (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32), ((1.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def save_png(path: str | os.PathLike, img) -> None:
  """Writes a ``(H, W, 3)`` image in ``[0, 1]`` as an 8-bit PNG."""
  from PIL import Image

  a = np.clip(np.asarray(img, np.float64), 0.0, 1.0)
  Image.fromarray(np.round(a * 255.0).astype(np.uint8)).save(os.fspath(path), format="PNG")
