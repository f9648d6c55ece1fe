"""peel_jax.data: TF-free tfds builders for local image folders and bundled images, and ``load_images``.

Everything is written under pytest's ``tmp_path`` (``data_dir=...``), never to the home cache.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
from PIL import Image

from peel_jax import data, images

SIZE = 16


def _save(path, arr, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(arr).save(path, **kw)


@pytest.fixture
def folder(tmp_path):
  """``imgs/{cat,dog}/...``: RGB and greyscale PNGs, an RGB JPEG and a palette PNG of different sizes."""
  rng = np.random.default_rng(0)
  root = tmp_path / "imgs"
  red = np.zeros((30, 40, 3), np.uint8)
  red[..., 0] = 255
  _save(root / "cat" / "a_red.png", red)
  _save(root / "cat" / "b_grey.png", rng.integers(0, 256, (50, 20), dtype=np.uint8))  # mode L
  _save(root / "cat" / "sub" / "c.jpg", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), quality=90)
  _save(root / "dog" / "d.jpeg", rng.integers(0, 256, (33, 33, 3), dtype=np.uint8))
  Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).convert("P").save(root / "dog" / "e.PNG")
  (root / "dog" / "notes.txt").write_text("not an image")  # ignored: no image extension
  (root / "dog" / ".DS_Store").write_bytes(b"\0\1")  # ignored: hidden
  (root / ".hidden_class").mkdir()  # ignored: hidden
  return root


EXPECTED_NAMES = ("cat/a_red.png", "cat/b_grey.png", "cat/sub/c.jpg", "dog/d.jpeg", "dog/e.PNG")


def test_folder_loads_labels_shapes_range_order(folder, tmp_path):
  s = data.load_images(str(folder), size=SIZE, data_dir=str(tmp_path / "tfds"))
  assert isinstance(s, data.ImageSet) and len(s) == 5 and s.source == str(folder)
  assert s.images.shape == (5, SIZE, SIZE, 3) and s.images.dtype == np.float32
  assert s.labels.dtype == np.int32 and s.labels.tolist() == [0, 0, 0, 1, 1]
  assert s.label_names == ("cat", "dog")
  assert s.names == EXPECTED_NAMES
  assert 0.0 <= s.images.min() and s.images.max() <= 1.0
  np.testing.assert_array_equal(s.images[0], np.broadcast_to(np.float32([1, 0, 0]), (SIZE, SIZE, 3)))
  # Stored losslessly (RGB JPEG/PNG byte for byte, the rest as PNG): identical to reading the files directly.
  for img, name in zip(s.images, s.names):
    np.testing.assert_array_equal(img, images.load_file(folder / name, SIZE), err_msg=name)
  again = data.load_images(str(folder), size=SIZE, data_dir=str(tmp_path / "tfds"))
  np.testing.assert_array_equal(again.images, s.images)
  assert again.names == s.names and again.labels.tolist() == s.labels.tolist()
  first2 = data.load_images(str(folder), size=SIZE, data_dir=str(tmp_path / "tfds"), limit=2)
  assert first2.names == EXPECTED_NAMES[:2]
  np.testing.assert_array_equal(first2.images, s.images[:2])
  sliced = data.load_images(str(folder), size=SIZE, data_dir=str(tmp_path / "tfds"), split="train[3:]")
  assert sliced.names == EXPECTED_NAMES[3:]


def _tree_mtimes(path):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(path) for f in fs}


def test_prepare_twice_is_a_noop_and_changed_folder_is_reprepared(folder, tmp_path, monkeypatch):
  ddir = str(tmp_path / "tfds")
  path = data.prepare(str(folder), data_dir=ddir)
  assert path.startswith(os.path.join(ddir, "peel_image_folder", "imgs_"))
  before = _tree_mtimes(path)

  def no_regeneration(p):
    raise AssertionError(f"regenerated {p}")

  with monkeypatch.context() as m:
    m.setattr(data, "_encoded_file", no_regeneration)
    assert data.prepare(str(folder), data_dir=ddir) == path
    assert len(data.load_images(str(folder), size=SIZE, data_dir=ddir)) == 5
  assert _tree_mtimes(path) == before

  _save(folder / "dog" / "f.png", np.full((10, 12, 3), 7, np.uint8))
  new_path = data.prepare(str(folder), data_dir=ddir)
  assert new_path != path and not os.path.exists(os.path.dirname(path))  # the stale copy is removed
  s = data.load_images(str(folder), size=SIZE, data_dir=ddir)
  assert s.names == EXPECTED_NAMES + ("dog/f.png",)

  # Another folder with the same base name never collides.
  other = tmp_path / "elsewhere" / "imgs"
  _save(other / "x" / "y.png", np.zeros((8, 8, 3), np.uint8))
  other_path = data.prepare(str(other), data_dir=ddir)
  assert other_path != new_path and os.path.exists(new_path)
  assert data.load_images(str(other), size=SIZE, data_dir=ddir).label_names == ("x",)


def test_folder_errors(tmp_path):
  ddir = str(tmp_path / "tfds")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(data.DataError, match="no class sub-folders"):
    data.load_images(str(empty), size=SIZE, data_dir=ddir)
  (empty / "loose.png").write_bytes(b"")
  (empty / "a").mkdir()
  (empty / "a" / "readme.txt").write_text("x")
  with pytest.raises(data.DataError, match="no image files"):
    data.load_images(str(empty), size=SIZE, data_dir=ddir)
  with pytest.raises(data.DataError, match="image folder not found"):
    data.load_images(str(tmp_path / "missing"), size=SIZE, data_dir=ddir)
  with pytest.raises(data.DataError, match="not a folder"):
    data.load_images(str(empty / "loose.png"), size=SIZE, data_dir=ddir)

  bad = tmp_path / "bad"
  _save(bad / "a" / "ok.png", np.zeros((8, 8, 3), np.uint8))
  (bad / "a" / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(images.ImageError, match="broken.png"):
    data.load_images(str(bad), size=SIZE, data_dir=ddir)
  (bad / "a" / "broken.png").unlink()  # nothing was marked prepared: a fixed folder loads
  assert data.load_images(str(bad), size=SIZE, data_dir=ddir).names == ("a/ok.png",)
  with pytest.raises(data.DataError, match="has no split 'test'"):
    data.load_images(str(bad), size=SIZE, data_dir=ddir, split="test")


def test_bad_sources_and_arguments(tmp_path):
  ddir = str(tmp_path / "tfds")
  with pytest.raises(data.DataError, match=r"unknown source 'nonsense'.*bundled:NAME.*tfds:NAME.*image folder"):
    data.load_images("nonsense", size=SIZE, data_dir=ddir)
  with pytest.raises(data.DataError, match="unknown source 'http:"):
    data.load_images("http://example.com/x", size=SIZE, data_dir=ddir)
  with pytest.raises(data.DataError, match="unknown bundled collection 'animals'.*faces, natural, medical, digits"):
    data.load_images("bundled:animals", size=SIZE, data_dir=ddir)
  with pytest.raises(data.DataError, match="size must be a positive integer"):
    data.load_images("bundled:digits", size=0, data_dir=ddir)
  with pytest.raises(data.DataError, match="limit must be"):
    data.load_images("bundled:digits", size=SIZE, data_dir=ddir, limit=-1)
  assert not os.path.exists(ddir)


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "cache"))
  assert data.default_data_dir() == str(tmp_path / "cache")
  monkeypatch.delenv(data.DATA_DIR_ENV)
  assert data.default_data_dir() == os.path.expanduser(os.path.join("~", ".cache", "peel_jax", "tfds"))


def test_bundled_digits(tmp_path):
  ddir = str(tmp_path / "tfds")
  s = data.load_images("bundled:digits", size=8, data_dir=ddir)  # 8x8: no resize, fast
  assert s.images.shape == (1797, 8, 8, 3) and s.labels.shape == (1797,)
  assert s.label_names == data.BUNDLED_COLLECTIONS["digits"] == tuple("0123456789")
  assert sorted(set(s.labels.tolist())) == list(range(10))
  assert s.images.min() == 0.0 and s.images.max() == 1.0
  np.testing.assert_array_equal(s.images[..., 0], s.images[..., 2])  # greyscale replicated
  from sklearn.datasets import load_digits

  np.testing.assert_array_equal(s.labels, load_digits().target)
  first = data.load_images("bundled:digits", size=SIZE, data_dir=ddir, limit=10)
  assert first.labels.tolist() == list(range(10)) and first.names[:2] == ("digits:0", "digits:1")


def test_bundled_faces(tmp_path):
  s = data.load_images("bundled:faces", size=SIZE, data_dir=str(tmp_path / "tfds"))
  assert s.label_names == ("grace_hopper", "astronaut", "lfw")
  assert np.bincount(s.labels).tolist() == [1, 1, 100]
  assert s.names[:2] == ("grace_hopper", "astronaut") and s.names[2] == "lfw:0" and s.names[101] == "lfw:99"
  np.testing.assert_allclose(s.images[1], images.bundled("astronaut", SIZE), atol=1 / 255)
  np.testing.assert_allclose(s.images[0], images.bundled("grace_hopper", SIZE), atol=0)  # JPEG stored losslessly


def test_bundled_natural_and_medical(tmp_path):
  ddir = str(tmp_path / "tfds")
  s = data.load_images("bundled:natural", size=SIZE, data_dir=ddir)
  assert s.names == s.label_names == ("chelsea", "coffee", "rocket", "china", "flower")
  assert s.labels.tolist() == [0, 1, 2, 3, 4]
  m = data.load_images("bundled:medical", size=SIZE, data_dir=ddir)
  assert m.names == ("retina",) and m.images.shape == (1, SIZE, SIZE, 3)


_HAS_TF = importlib.util.find_spec("tensorflow") is not None


@pytest.mark.skipif(_HAS_TF, reason="checks the error raised when TensorFlow is missing")
def test_registered_dataset_without_tensorflow(tmp_path):
  # Not prepared (tfds then assumes tfrecord, which needs tf.data): a clear error, not a download.
  with pytest.raises(data.DataError, match=r"tfds:mnist .*need TensorFlow.*local image folder"):
    data.load_images("tfds:mnist", size=SIZE, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(data.DataError, match="not a registered tfds dataset"):
    data.load_images("tfds:no_such_dataset_xyz", size=SIZE, data_dir=str(tmp_path / "tfds"))
  with pytest.raises(data.DataError, match="empty dataset name"):
    data.load_images("tfds:", size=SIZE)


def test_registered_dataset_reading_path_with_mock_data(tmp_path):
  """``tfds.testing.mock_data`` fakes ``tfds.data_source`` without TF, so the ``tfds:`` reading code runs for real.

  With TensorFlow installed the code would read through ``data_source`` too (array_record datasets), so this test
  exercises the same path either way; the ``tfds.load`` fallback (tfrecord datasets) needs TF and is not covered.
  """
  import tensorflow_datasets as tfds

  ddir = str(tmp_path / "tfds")
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path / "no_metadata")):
    s = data.load_images("tfds:mnist", size=SIZE, data_dir=ddir)
    assert s.images.shape == (6, SIZE, SIZE, 3) and s.images.dtype == np.float32  # (28, 28, 1) -> RGB
    assert 0.0 <= s.images.min() and s.images.max() <= 1.0
    assert s.label_names == tuple(str(d) for d in range(10))
    assert s.labels.dtype == np.int32 and all(0 <= v < 10 for v in s.labels)
    assert s.names == tuple(f"mnist/train:{i}" for i in range(6)) and s.source == "tfds:mnist"
    np.testing.assert_array_equal(data.load_images("tfds:mnist", size=SIZE, data_dir=ddir).images, s.images)

    v = data.load_images("tfds:imagenet2012", size=SIZE, split="validation", data_dir=ddir, limit=3)
    assert len(v) == 3 and len(v.label_names) == 1000 and all(isinstance(n, str) for n in v.names)  # file_name

    c = data.load_images("tfds:celeb_a", size=SIZE, split="test", data_dir=ddir, limit=4)  # identity/Identity_No
    assert len(c) == 4 and all(0 <= v < len(c.label_names) for v in c.labels)
    assert sorted(int(n) for n in c.label_names) == [int(n) for n in c.label_names]
  assert not os.path.exists(ddir)
