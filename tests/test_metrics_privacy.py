"""Model-inversion privacy metrics: KNN distance, attack accuracy, evaluation-network embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peel_jax import metrics, models


def _knn_brute(rf, pf, rl, pl):
  out = np.empty(len(rf))
  for i in range(len(rf)):
    best = np.inf
    for j in range(len(pf)):
      if pl[j] == rl[i]:
        best = min(best, float(np.sum((np.float64(rf[i]) - np.float64(pf[j])) ** 2)))
    out[i] = best
  return out


def test_knn_distance_matches_a_brute_force_loop(rng):
  rf = rng.normal(size=(23, 7)).astype(np.float32)
  pf = rng.normal(size=(40, 7)).astype(np.float32)
  pl = rng.integers(0, 5, size=40)
  pl[:5] = np.arange(5)  # every class has a private image
  rl = rng.integers(0, 5, size=23)
  d = metrics.knn_distance(rf, pf, rl, pl)
  assert d.shape == (23,) and d.dtype == np.float64
  np.testing.assert_allclose(d, _knn_brute(rf, pf, rl, pl), rtol=1e-12)


def test_knn_distance_chunks_and_exact_zero(rng, monkeypatch):
  monkeypatch.setattr(metrics, "_KNN_CHUNK_ELEMENTS", 10)  # one reconstruction at a time
  pf = rng.normal(size=(6, 4))
  pl = np.array([0, 0, 1, 1, 2, 2])
  rf = np.concatenate([pf[[1, 4]], rng.normal(size=(3, 4))])
  rl = np.array([0, 2, 1, 1, 0])
  d = metrics.knn_distance(rf, pf, rl, pl)
  assert d[0] == 0.0 and d[1] == 0.0  # identical features, exactly
  np.testing.assert_allclose(d, _knn_brute(rf, pf, rl, pl), rtol=1e-12)
  # Only the same class counts: pf[1] is class 0, so as a class-1 reconstruction it is not at distance 0.
  assert metrics.knn_distance(pf[1:2], pf, [1], pl)[0] > 0


def test_knn_distance_errors_name_the_missing_label():
  pf, pl = np.zeros((3, 2)), np.array([0, 1, 1])
  with pytest.raises(ValueError, match=r"label\(s\) \[7\]"):
    metrics.knn_distance(np.zeros((2, 2)), pf, [0, 7], pl)
  with pytest.raises(ValueError, match="dimensions differ"):
    metrics.knn_distance(np.zeros((2, 3)), pf, [0, 1], pl)
  with pytest.raises(ValueError, match="recon_labels"):
    metrics.knn_distance(np.zeros((2, 2)), pf, [0], pl)
  with pytest.raises(ValueError, match="integer"):
    metrics.knn_distance(np.zeros((1, 2)), pf, [0.5], pl)


def test_attack_accuracy_on_hand_made_logits():
  original = np.array([[5.0, 1, 0, 0], [0, 3, 1, 0], [0, 0, 0, 9], [1, 2, 3, 4]])
  recon = np.array([
      [4.0, 0, 0, 0],  # top-1 agrees
      [3.0, 2, 1, 0],  # class 1 second: top-2 and up
      [9.0, 8, 7, 6],  # class 3 last: only top-4
      [1.0, 2, 3, 4],  # identical: agrees
  ])
  out = metrics.attack_accuracy(original, recon, k=(1, 2, 3))
  np.testing.assert_array_equal(out["top1_per_image"], [True, False, False, True])
  np.testing.assert_array_equal(out["top2_per_image"], [True, True, False, True])
  np.testing.assert_array_equal(out["top3_per_image"], [True, True, False, True])
  assert out["top1"] == 0.5 and out["top2"] == 0.75 and out["top3"] == 0.75
  assert out["top1_per_image"].dtype == bool
  # k beyond the 4 classes clamps to 4: every image agrees; the key keeps the requested k.
  out = metrics.attack_accuracy(original, recon)
  assert set(out) == {"top1", "top5", "top1_per_image", "top5_per_image"}
  assert out["top5"] == 1.0 and out["top5_per_image"].all()
  one = metrics.attack_accuracy(original, recon, k=1)
  assert set(one) == {"top1", "top1_per_image"} and one["top1"] == 0.5


def test_attack_accuracy_ties_follow_argmax_and_errors():
  # Ties in the reconstruction: the lowest index wins, as np.argmax.
  out = metrics.attack_accuracy([[0.0, 1.0], [1.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]], k=1)
  np.testing.assert_array_equal(out["top1_per_image"], [False, True])
  with pytest.raises(ValueError, match="one shape"):
    metrics.attack_accuracy(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match="k must be"):
    metrics.attack_accuracy(np.zeros((2, 3)), np.zeros((2, 3)), k=(0,))


def test_evaluation_embeddings_shapes_and_identity(photo):
  model = models.resnet18(num_classes=10)
  variables = model.init(jax.random.key(0), jnp.asarray(photo))
  x = np.concatenate([photo, photo[:1]])  # 3 images, chunks of 2: the last chunk padded
  feats, logits = metrics.evaluation_embeddings(model, variables, x, batch_size=2)
  assert feats.shape == (3, 512) and logits.shape == (3, 10)
  assert feats.dtype == np.float32 and np.isfinite(feats).all() and np.isfinite(logits).all()
  ref = jax.jit(lambda v, t: model.apply(v, t))(variables, jnp.asarray(x))
  np.testing.assert_allclose(logits, np.asarray(ref), rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  # The same image twice: distance 0 and full agreement.
  d = metrics.knn_distance(feats[2:], feats[:1], [3], [3])
  assert d[0] == pytest.approx(0.0, abs=1e-8 * float(np.sum(feats[0] ** 2)))
  acc = metrics.attack_accuracy(logits[:1], logits[2:])
  assert acc["top1"] == 1.0 and acc["top5"] == 1.0
  empty_f, empty_l = metrics.evaluation_embeddings(model, variables, x[:0])
  assert empty_f.shape == (0, 512) and empty_l.shape == (0, 10)
  with pytest.raises(ValueError, match="batch"):
    metrics.evaluation_embeddings(model, variables, x[0])
