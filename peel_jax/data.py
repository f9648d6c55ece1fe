"""Image datasets for the experiments, through tensorflow-datasets (tfds) but without TensorFlow.

One entry point, :func:`load_images`, turns a *source* into an :class:`ImageSet` of square ``[0, 1]`` images with
integer labels (identity or class, so "same label" means "same person/class"). Sources:

* ``"bundled:NAME"``: the images shipped inside installed wheels, as the collections of
  :data:`BUNDLED_COLLECTIONS` (nothing is downloaded; every member loads offline here):

  - ``faces``: matplotlib ``grace_hopper.jpg``, scikit-image ``astronaut``, then scikit-image ``lfw_subset`` (its
    first 100 images are faces, 25x25 greyscale; the other 100 are not faces and are left out), in that order (the
    two full-resolution portraits first, for small runs). Labels are the source (``grace_hopper``, ``astronaut``,
    ``lfw``): the 100 LFW faces share one label.
  - ``natural``: scikit-image ``chelsea``, ``coffee``, ``rocket``; scikit-learn ``china.jpg``, ``flower.jpg``.
  - ``medical``: scikit-image ``retina`` (a 1411x1411 fundus photo).
  - ``digits``: scikit-learn ``load_digits`` (1797 8x8 greyscale digits, labels 0-9; values 0..16 scaled to
    uint8 and replicated to RGB).

* a path to a local image folder laid out as ``root/<class_name>/<image files>`` (CelebA or FaceScrub sorted by
  identity, a chest X-ray set, an ImageNet validation folder sorted by synset, ...). Labels are the sorted
  sub-folder names; images in nested folders below a class folder belong to that class; hidden entries, files
  without an image extension and files directly in ``root`` are ignored.
* ``"tfds:NAME"``: a registered tfds dataset already prepared under ``data_dir`` (nothing is downloaded). It is read
  with ``tfds.data_source`` (no TensorFlow) when prepared with ``file_format="array_record"``, else with
  ``tfds.load(..., download=False)``, which needs TensorFlow; without it, :class:`DataError` says so and suggests a
  local folder. Labels: ``label`` or the first ``ClassLabel``; CelebA's ``identity/Identity_No`` (ids mapped to
  ``0..K-1`` in sorted order); else ``-1``. Names: ``file_name`` when present, else ``NAME/split:index``.

Storage. Bundled collections and local folders are written by two TF-free ``tfds.core.GeneratorBasedBuilder``
subclasses (:class:`PeelBundledImages`, :class:`PeelImageFolder`) with ``file_format="array_record"`` and read back
with ``as_data_source()`` (random access, no TensorFlow). Images use ``tfds.features.Image(shape=(None, None, 3))``:
its encoder needs TensorFlow only for numpy arrays, not for ``PIL.Image`` objects (encoded by Pillow, PNG) or raw
encoded bytes (stored as they are), and its numpy decoder uses Pillow. RGB JPEG/PNG files from a folder are stored
byte for byte (no re-encoding, no size blow-up); every other image (greyscale, palette, RGBA, 16-bit, other
formats, the bundled arrays) is converted to 8-bit RGB and stored as lossless PNG. (A ``Tensor(shape=(None, None,
3))`` feature would also work without TF, but must be ``zlib``/``bytes`` encoded and stores raw pixels: several
times larger for photo folders.) ``disable_shuffling=True`` keeps records in generation order, so order is
deterministic and ``limit`` keeps the first images.

Caching. Prepared data live under ``data_dir`` (default :func:`default_data_dir`: ``$PEEL_JAX_DATA_DIR`` or
``~/.cache/peel_jax/tfds``) as ``<builder>/<config>/<version>/``; preparing again is a no-op. A folder's config name
is ``<basename>_<hash of its absolute path>_<hash of its file list, sizes and mtimes>``, so two folders never
collide and a changed folder is prepared afresh; the stale copy of the same folder is then deleted.

Unreadable images. An image file in a folder that Pillow cannot decode raises :class:`peel_jax.images.ImageError`
naming the file, and nothing is marked prepared (skipping it silently would change which identities/classes the
experiment sees). Fix or remove the file and load again.

Without TensorFlow, tfds logs (absl, not Python warnings) "OpenCV is not installed ... Defaulting to PIL" once and
"Using custom data configuration" for folders; both are harmless.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import re
import shutil

import numpy as np

from peel_jax import images as _images
from peel_jax.images import ImageError

__all__ = ["BUNDLED_COLLECTIONS", "DATA_DIR_ENV", "IMAGE_EXTENSIONS", "DataError", "ImageError", "ImageSet",
           "default_data_dir", "load_images", "prepare", "PeelBundledImages", "PeelImageFolder"]

BUNDLED_COLLECTIONS: dict[str, tuple[str, ...]] = {
    "faces": ("grace_hopper", "astronaut", "lfw"),
    "natural": ("chelsea", "coffee", "rocket", "china", "flower"),
    "medical": ("retina",),
    "digits": tuple(str(d) for d in range(10)),
}
"""Bundled collection -> member names, which are also its label names (label ``k`` is member ``k``)."""

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".pbm", ".pgm", ".pnm", ".ppm", ".tif", ".tiff", ".webp")
"""File extensions (case-insensitive) treated as images in a local folder; other files are ignored."""

DATA_DIR_ENV = "PEEL_JAX_DATA_DIR"

_N_LFW_FACES = 100  # skimage.data.lfw_subset(): images 0..99 are faces, 100..199 are non-faces.

_SOURCE_FORMS = ("bundled:NAME (NAME one of " + ", ".join(BUNDLED_COLLECTIONS) + "), "
                 "tfds:NAME (a registered tfds dataset prepared under data_dir), "
                 "or a path to an image folder root/<class_name>/<image files>")


class DataError(ValueError):
  """A dataset source that cannot be found, prepared or read."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
  """Images with labels, in a deterministic order.

  Attributes:
    images: ``(N, size, size, 3)`` float32 in ``[0, 1]``, centre-cropped to a square and resized.
    labels: ``(N,)`` int32, indices into ``label_names`` (identity or class); ``-1`` where the source has none.
    label_names: name of each label.
    names: ``N`` per-image ids: a path relative to the folder root, ``lfw:12``, ``digits:5``, ...
    source: the source string the set was loaded from.
  """

  images: np.ndarray
  labels: np.ndarray
  label_names: tuple[str, ...]
  names: tuple[str, ...]
  source: str

  def __len__(self) -> int:
    return int(self.labels.shape[0])


def default_data_dir() -> str:
  """Where prepared datasets go: ``$PEEL_JAX_DATA_DIR``, else ``~/.cache/peel_jax/tfds``."""
  return os.path.expanduser(os.environ.get(DATA_DIR_ENV) or os.path.join("~", ".cache", "peel_jax", "tfds"))


def _tfds():
  import tensorflow_datasets as tfds

  return tfds


def _has_tensorflow() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _uint8_rgb(img01: np.ndarray) -> np.ndarray:
  """``[0, 1]`` image (any layout :func:`peel_jax.images._to_rgb01` takes) -> ``(H, W, 3)`` uint8."""
  return np.round(_images._to_rgb01(img01) * 255.0).astype(np.uint8)


def _pil(img: np.ndarray):
  """``(H, W, 3)`` uint8 -> ``PIL.Image`` (which tfds' Image feature encodes as PNG without TensorFlow)."""
  from PIL import Image

  return Image.fromarray(np.ascontiguousarray(img, np.uint8))


# --------------------------------------------------------------------------------------------------------------------
# Builders (defined lazily: importing peel_jax.data must not import tensorflow_datasets).


@functools.lru_cache(maxsize=None)
def _builder_classes():
  """``(PeelBundledImages, PeelImageFolder, ImageFolderConfig)``, defined on first use.

  Lazy so that importing :mod:`peel_jax.data` (e.g. for :data:`BUNDLED_COLLECTIONS` in CLI help) does not import
  tensorflow_datasets; the module-level names resolve through :func:`__getattr__`.
  """
  return _define_builders(_tfds())


def __getattr__(name: str):
  classes = ("PeelBundledImages", "PeelImageFolder", "ImageFolderConfig")
  if name in classes:
    return _builder_classes()[classes.index(name)]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_builders(tfds):
  features = lambda names: tfds.features.FeaturesDict({  # noqa: E731
      "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png"),
      "label": tfds.features.ClassLabel(names=list(names)),
      "name": tfds.features.Text(),
  })

  class PeelBundledImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The images bundled in installed wheels, one config per collection of :data:`BUNDLED_COLLECTIONS`."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First version.", "1.1.0": "faces: the two portraits first."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, description=f"bundled {c}") for c in BUNDLED_COLLECTIONS]

    def _info(self):
      names = BUNDLED_COLLECTIONS[self.builder_config.name]
      return tfds.core.DatasetInfo(builder=self, description=f"peel_jax bundled images: {', '.join(names)}",
                                   features=features(names),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      members = BUNDLED_COLLECTIONS[self.builder_config.name]
      for i, (name, label, img) in enumerate(_bundled_items(self.builder_config.name)):
        yield i, {"image": img, "label": members.index(label), "name": name}

  @dataclasses.dataclass(eq=False)
  class ImageFolderConfig(tfds.core.BuilderConfig):
    """One local folder: its absolute root, sorted class names and ``(relative path, label)`` files."""

    root: str = ""
    classes: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    files: tuple[tuple[str, int], ...] = dataclasses.field(default=(), repr=False)

  class PeelImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A local ``root/<class_name>/<image files>`` folder; the config is made by :func:`_folder_config`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=f"image folder {self.builder_config.root}",
                                   features=features(self.builder_config.classes), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      cfg = self.builder_config
      for i, (rel, label) in enumerate(cfg.files):
        yield i, {"image": _encoded_file(os.path.join(cfg.root, rel)), "label": label, "name": rel}

  for cls in (PeelBundledImages, PeelImageFolder, ImageFolderConfig):
    cls.__qualname__ = cls.__name__  # reads as peel_jax.data.PeelImageFolder, not _define_builders.<locals>...
  return PeelBundledImages, PeelImageFolder, ImageFolderConfig


def _bundled_items(collection: str):
  """Yields ``(name, member, image)`` of a bundled collection; ``image`` is something tfds' Image encodes."""
  if collection == "faces":
    from skimage import data

    # The two full-resolution portraits first: small studies take the first images.
    yield "grace_hopper", "grace_hopper", _pil(_uint8_rgb(_images.bundled("grace_hopper")))
    yield "astronaut", "astronaut", _pil(_uint8_rgb(data.astronaut()))
    faces = data.lfw_subset()[:_N_LFW_FACES]
    for k, face in enumerate(faces):
      yield f"lfw:{k}", "lfw", _pil(_uint8_rgb(face))
  elif collection == "natural":
    from skimage import data
    from sklearn.datasets import load_sample_image

    for name in ("chelsea", "coffee", "rocket"):
      yield name, name, _pil(_uint8_rgb(getattr(data, name)()))
    for name in ("china", "flower"):
      yield name, name, _pil(_uint8_rgb(load_sample_image(f"{name}.jpg")))
  elif collection == "medical":
    from skimage import data

    yield "retina", "retina", _pil(_uint8_rgb(data.retina()))
  elif collection == "digits":
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    for k, (img, target) in enumerate(zip(pixels, digits.target)):
      yield f"digits:{k}", str(int(target)), _pil(_uint8_rgb(img))
  else:  # guarded by the caller
    raise DataError(f"unknown bundled collection {collection!r}")


def _encoded_file(path: str):
  """An image file for tfds' Image feature: the file's bytes when RGB JPEG/PNG, else an RGB ``PIL.Image``.

  Raises:
    ImageError: Pillow cannot decode the file (the message names it).
  """
  from PIL import Image

  img = _images.load_file(path)  # decodes fully: raises ImageError naming the file when it is unreadable
  with Image.open(path) as im:
    as_is = im.format in ("JPEG", "PNG") and im.mode == "RGB"
  if as_is:
    with open(path, "rb") as f:
      return f.read()
  return _pil(_uint8_rgb(img))


# --------------------------------------------------------------------------------------------------------------------
# Local folders.


def _is_image(name: str) -> bool:
  return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan_folder(root: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...], str]:
  """Returns ``(classes, files, digest)`` of ``root/<class>/...``: files as ``(posix relative path, label)``.

  ``digest`` hashes every file's relative path, size and mtime.

  Raises:
    DataError: ``root`` has no class sub-folders, or they hold no image files.
  """
  classes = tuple(sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")))
  if not classes:
    raise DataError(f"image folder {root} has no class sub-folders; expected root/<class_name>/<image files>")
  files, h = [], hashlib.sha256()
  for label, cls in enumerate(classes):
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for fname in sorted(filenames):
        if not _is_image(fname):
          continue
        path = os.path.join(dirpath, fname)
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        st = os.stat(path)
        files.append((rel, label))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  if not files:
    raise DataError(f"image folder {root} has class sub-folders ({', '.join(classes)}) but no image files "
                    f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
  h.update("\0".join(classes).encode())
  return classes, tuple(files), h.hexdigest()


def _folder_key(root: str) -> str:
  """``<basename>_<8 hex of the absolute path>_``: the prefix of every config name of this folder."""
  slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_")[:40] or "root"
  return f"{slug}_{hashlib.sha256(root.encode()).hexdigest()[:8]}_"


def _folder_builder(root: str, data_dir: str):
  _, PeelImageFolder, ImageFolderConfig = _builder_classes()
  root = os.path.realpath(os.path.expanduser(root))
  if not os.path.exists(root):
    raise DataError(f"image folder not found: {root}")
  if not os.path.isdir(root):
    raise DataError(f"not a folder: {root}; expected an image folder root/<class_name>/<image files>")
  classes, files, digest = _scan_folder(root)
  cfg = ImageFolderConfig(name=_folder_key(root) + digest[:12], version="1.0.0", root=root, classes=classes,
                          files=files, description=f"image folder {root}")
  return PeelImageFolder(config=cfg, data_dir=data_dir, file_format="array_record")


def _remove_stale(builder) -> None:
  """Deletes other prepared copies of the same folder (same path key, different content hash)."""
  parent = os.path.dirname(os.path.dirname(os.fspath(builder.data_path)))  # <data_dir>/peel_image_folder
  name = builder.builder_config.name
  stale = re.compile(re.escape(name[:-12]) + r"[0-9a-f]{12}$")
  for entry in os.scandir(parent):
    if entry.is_dir() and entry.name != name and stale.match(entry.name):
      shutil.rmtree(entry.path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Public API.


def _builder(source: str, data_dir: str | None):
  """The prepared builder of a ``bundled:`` or folder source (prepares it when needed)."""
  data_dir = os.path.expanduser(data_dir) if data_dir is not None else default_data_dir()
  if source.startswith("bundled:"):
    collection = source[len("bundled:"):]
    if collection not in BUNDLED_COLLECTIONS:
      raise DataError(f"unknown bundled collection {collection!r}; expected one of {', '.join(BUNDLED_COLLECTIONS)}")
    PeelBundledImages, _, _ = _builder_classes()
    builder = PeelBundledImages(config=collection, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
  builder = _folder_builder(source, data_dir)
  builder.download_and_prepare()
  _remove_stale(builder)
  return builder


def _check_source(source: str) -> str:
  source = os.fspath(source)
  if source.startswith(("bundled:", "tfds:")):
    return source
  path = os.path.expanduser(source)
  if os.path.exists(path):
    return source
  looks_like_path = os.sep in source or source.startswith((".", "~"))
  if re.match(r"^[A-Za-z][\w.-]*:", source) or not looks_like_path:
    raise DataError(f"unknown source {source!r}: no such folder and not a known form; expected {_SOURCE_FORMS}")
  raise DataError(f"image folder not found: {source} (sources are {_SOURCE_FORMS})")


def prepare(source: str, *, data_dir: str | None = None) -> str:
  """Prepares a ``bundled:`` or local-folder source under ``data_dir`` (no-op when already prepared).

  Args:
    source: ``"bundled:NAME"`` or a path to an image folder (see :func:`load_images`).
    data_dir: where to write; default :func:`default_data_dir`.

  Returns:
    The prepared dataset's directory (``<data_dir>/<builder>/<config>/<version>``).

  Raises:
    DataError: unknown source, missing or empty folder, or a ``tfds:`` source (those are prepared by tfds itself).
    ImageError: an image file in the folder cannot be decoded.
  """
  source = _check_source(source)
  if source.startswith("tfds:"):
    raise DataError(f"{source}: registered tfds datasets are prepared by tfds itself (tfds build / tfds.load)")
  return os.fspath(_builder(source, data_dir).data_path)


def load_images(source: str, *, size: int, split: str = "train", data_dir: str | None = None,
                limit: int | None = None) -> ImageSet:
  """Loads a dataset as square ``size`` x ``size`` images in ``[0, 1]`` with labels, in a deterministic order.

  Args:
    source: ``"bundled:faces"``, ``"bundled:natural"``, ``"bundled:medical"``, ``"bundled:digits"`` (see
      :data:`BUNDLED_COLLECTIONS`); a path to a local image folder ``root/<class_name>/<image files>``; or
      ``"tfds:NAME"`` for a registered tfds dataset already prepared under ``data_dir``.
    size: output side in pixels; images are centre-cropped to a square, then resized
      (:func:`peel_jax.images.resize`).
    split: tfds split (bundled collections and folders have only ``"train"``); tfds slicing such as
      ``"train[:10]"`` is accepted.
    data_dir: where prepared datasets live. Default: :func:`default_data_dir` for bundled and folder sources, tfds'
      own default (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``) for ``tfds:`` sources.
    limit: keep only the first ``limit`` images (a folder or collection is still prepared whole, once).

  Returns:
    An :class:`ImageSet`.

  Raises:
    DataError: unknown source or collection, missing/empty folder, unknown split, or a ``tfds:`` dataset that is
      not prepared or needs TensorFlow.
    ImageError: an image in a local folder cannot be decoded (the message names the file).
  """
  source = _check_source(source)
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise DataError(f"size must be a positive integer, got {size!r}")
  if limit is not None and limit < 0:
    raise DataError(f"limit must be >= 0 or None, got {limit}")
  if source.startswith("tfds:"):
    return _load_registered(source, size=size, split=split, data_dir=data_dir, limit=limit)
  builder = _builder(source, data_dir)
  ds = _data_source(builder, split, source)
  n = len(ds) if limit is None else min(limit, len(ds))
  imgs = np.empty((n, size, size, 3), np.float32)
  labels = np.empty((n,), np.int32)
  names = []
  for i in range(n):
    ex = ds[i]
    imgs[i] = _images.resize(_images._to_rgb01(ex["image"]), size)
    labels[i] = int(ex["label"])
    names.append(_text(ex["name"]))
  label_names = tuple(builder.info.features["label"].names)
  return ImageSet(imgs, labels, label_names, tuple(names), source)


def _text(v) -> str:
  v = v.item() if isinstance(v, np.ndarray) else v
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _data_source(builder, split: str, source: str):
  splits = list(builder.info.splits)
  if split.partition("[")[0] not in splits:
    raise DataError(f"{source} has no split {split!r}; splits: {', '.join(splits)}")
  return builder.as_data_source(split=split)


# --------------------------------------------------------------------------------------------------------------------
# Registered tfds datasets.


def _label_reader(features):
  """``(read(example) -> int | None, names or None)`` for a registered dataset's features.

  Uses ``label`` or the first top-level ``ClassLabel``; else CelebA's ``identity/Identity_No``; else no label.
  """
  tfds = _tfds()
  keys = list(features.keys())
  class_keys = [k for k in keys if isinstance(features[k], tfds.features.ClassLabel)]
  key = "label" if "label" in class_keys else (class_keys[0] if class_keys else None)
  if key is not None:
    return (lambda ex: int(ex[key])), tuple(features[key].names)
  if "identity" in keys and isinstance(features["identity"], tfds.features.FeaturesDict) \
      and "Identity_No" in features["identity"].keys():
    return (lambda ex: int(np.asarray(ex["identity"]["Identity_No"]))), None
  return (lambda ex: None), None


def _image_key(features, name: str) -> str:
  tfds = _tfds()
  keys = [k for k in features.keys() if isinstance(features[k], tfds.features.Image)]
  if not keys:
    raise DataError(f"tfds:{name} has no image feature (features: {', '.join(features.keys())})")
  return "image" if "image" in keys else keys[0]


def _registered_examples(name: str, split: str, data_dir: str | None, limit: int | None):
  """``(features, iterable of numpy examples)`` of a prepared registered dataset."""
  tfds = _tfds()
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    n = len(ds) if limit is None else min(limit, len(ds))
    return ds.dataset_info.features, (ds[i] for i in range(n))
  except tfds.core.DatasetNotFoundError as e:
    raise DataError(f"tfds:{name} is not a registered tfds dataset ({str(e).splitlines()[0]})") from None
  except NotImplementedError as e:  # prepared as tfrecord (or not at all): tf.data is needed
    if not _has_tensorflow():
      raise DataError(
          f"tfds:{name} could not be read without TensorFlow: registered tfds datasets prepared as tfrecord (the "
          f"default) need TensorFlow (pip install tensorflow), and no array_record copy was found under "
          f"{data_dir or 'the tfds default data_dir'}. Without TensorFlow, point the source at a local image "
          f"folder root/<class_name>/<image files> instead. ({str(e).splitlines()[0]})") from None
  try:
    tf_ds, info = tfds.load(name, split=split, data_dir=data_dir, download=False, with_info=True)
  except AssertionError as e:  # tfds' "dataset not found in data_dir" with download=False
    raise DataError(f"tfds:{name} is not prepared under {data_dir or 'the tfds default data_dir'}: {e}") from None
  if limit is not None:
    tf_ds = tf_ds.take(limit)
  return info.features, tfds.as_numpy(tf_ds)


def _load_registered(source: str, *, size: int, split: str, data_dir: str | None, limit: int | None) -> ImageSet:
  name = source[len("tfds:"):]
  if not name:
    raise DataError(f"empty dataset name in {source!r}; expected tfds:NAME, e.g. tfds:celeb_a")
  features, examples = _registered_examples(name, split, os.path.expanduser(data_dir) if data_dir else None, limit)
  image_key = _image_key(features, name)
  read_label, label_names = _label_reader(features)
  imgs, raw_labels, names = [], [], []
  for i, ex in enumerate(examples):
    imgs.append(_images.resize(_images._to_rgb01(ex[image_key]), size))
    raw_labels.append(read_label(ex))
    names.append(_text(ex["file_name"]) if "file_name" in ex else f"{name}/{split}:{i}")
  if label_names is None and any(v is not None for v in raw_labels):  # raw ids (CelebA identities) -> 0..K-1
    ids = sorted({v for v in raw_labels if v is not None})
    index = {v: k for k, v in enumerate(ids)}
    raw_labels = [index.get(v, -1) if v is not None else -1 for v in raw_labels]
    label_names = tuple(str(v) for v in ids)
  labels = np.array([-1 if v is None else v for v in raw_labels], np.int32)
  images = np.stack(imgs) if imgs else np.empty((0, size, size, 3), np.float32)
  return ImageSet(images.astype(np.float32, copy=False), labels, label_names or (), tuple(names), source)
