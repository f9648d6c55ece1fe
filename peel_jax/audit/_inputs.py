"""What the audit reads: the user's network (architecture, variant, weights) and images, each checked up front.

Every problem a user can cause (an unknown architecture, weights of another architecture, a folder without
images, an unreadable image) raises :class:`peel_jax.runs.BadConfig` with one line naming it, before anything is
written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np

from peel_jax.runs import BadConfig

VARIANTS = ("torchvision", "paper")


@dataclasses.dataclass(frozen=True, eq=False)
class AuditImages:
  """The images audited, resized to the network's input.

  Attributes:
    pixels: ``(N, size, size, 3)`` float32 in ``[0, 1]``, each centre-cropped to a square and resized.
    names: per image, its name (a path relative to the folder, or the bundled collection's name).
    original_shapes: per image, ``(height, width)`` before cropping and resizing.
    source: the ``--images`` argument.
    digest: SHA-256 of the names and the resized 8-bit pixels (a rerun into the same ``--out`` resumes only when it
      is unchanged).
  """

  pixels: np.ndarray
  names: tuple[str, ...]
  original_shapes: tuple[tuple[int, int], ...]
  source: str
  digest: str

  def resized(self) -> list[tuple[str, tuple[int, int]]]:
    """``[(name, (height, width)), ...]`` of the images whose original size was not ``size`` x ``size``."""
    size = self.pixels.shape[1]
    return [(n, s) for n, s in zip(self.names, self.original_shapes) if tuple(s) != (size, size)]


def _digest(names, pixels) -> str:
  h = hashlib.sha256()
  for n in names:
    h.update(n.encode() + b"\0")
  h.update(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8).tobytes())
  return h.hexdigest()


def _folder_files(root: str) -> list[str]:
  from peel_jax.data import IMAGE_EXTENSIONS

  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for f in sorted(filenames):
      if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
        found.append(os.path.join(dirpath, f))
  if not found:
    raise BadConfig(f"no images in folder {root!r} (looked for {', '.join(IMAGE_EXTENSIONS)} files, in sub-folders "
                    "too)")
  return found


def _bundled(source: str, limit: int) -> tuple[list[str], list[np.ndarray]]:
  from peel_jax import data
  from peel_jax.images import _to_rgb01

  collection = source[len("bundled:"):]
  if collection not in data.BUNDLED_COLLECTIONS:
    raise BadConfig(f"unknown bundled collection {collection!r}; expected bundled:NAME with NAME one of "
                    f"{', '.join(data.BUNDLED_COLLECTIONS)}")
  # The prepared tfds copy (offline, prepared once) keeps the original sizes, which the report states.
  ds = data._builder(source, None).as_data_source(split="train")
  names, raw = [], []
  for i in range(min(limit, len(ds))):
    ex = ds[i]
    names.append(data._text(ex["name"]))
    raw.append(_to_rgb01(ex["image"]))
  return names, raw


def load_images(source: str, size: int, limit: int) -> AuditImages:
  """The first ``limit`` images of ``source``, centre-cropped to a square and resized to ``size`` x ``size``.

  Args:
    source: ``bundled:NAME`` (a collection of :data:`peel_jax.data.BUNDLED_COLLECTIONS`), a folder (every image
      file in it and its sub-folders, sorted by relative path), or one image file.
    size: the side the network takes.
    limit: at most this many images (the first ones in that order).

  Raises:
    BadConfig: an unknown collection, a missing path, a folder without image files, or an image Pillow cannot
      decode (the message names the file).
  """
  from peel_jax import images

  if source.startswith("bundled:"):
    names, raw = _bundled(source, limit)
  else:
    path = os.path.expanduser(source)
    if not os.path.exists(path):
      raise BadConfig(f"--images {source!r}: no such folder or file (or use bundled:faces)")
    files = _folder_files(path)[:limit] if os.path.isdir(path) else [path]
    names = [os.path.relpath(f, path).replace(os.sep, "/") if os.path.isdir(path) else os.path.basename(f)
             for f in files]
    raw = []
    for f in files:
      try:
        raw.append(images.load_file(f))
      except images.ImageError as e:
        raise BadConfig(f"unreadable image: {e}") from None
  pixels = np.stack([images.resize(r, size) for r in raw]).astype(np.float32)
  shapes = tuple((int(r.shape[0]), int(r.shape[1])) for r in raw)
  return AuditImages(pixels, tuple(names), shapes, source, _digest(names, pixels))


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def variant_options(variant: str) -> dict:
  from peel_jax import models

  if variant not in VARIANTS:
    raise BadConfig(f"unknown --variant {variant!r}; expected one of {', '.join(VARIANTS)}")
  return models.paper_variant() if variant == "paper" else {}


def get_model(arch: str, variant: str):
  """The Flax model of ``arch`` in ``variant``; :class:`BadConfig` for an unknown architecture."""
  from peel_jax import models

  try:
    return models.get_model(arch, **variant_options(variant))
  except ValueError as e:
    raise BadConfig(str(e)) from None


def load_variables(model, arch: str, variant: str, weights: str | None, seed: int, size: int) -> dict:
  """Flax variables from a torchvision ``state_dict`` file, or the seeded random init without one.

  Raises:
    BadConfig: the file is missing or unreadable, or holds the weights of another architecture (the message says
      which keys do not fit, and which architecture the file looks like).
  """
  import jax
  import jax.numpy as jnp

  from peel_jax import port

  if weights is None:
    v = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3), jnp.float32))
    return {k: a for k, a in v.items() if k in ("params", "batch_stats")}
  if not os.path.isfile(weights):
    raise BadConfig(f"weights file not found: {weights}")
  try:
    return port.from_torchvision(weights, arch, **variant_options(variant))
  except (port.PortError, OSError, ImportError, ValueError) as e:
    raise BadConfig(f"cannot use weights {weights!r}: {str(e).splitlines()[0]}") from None
