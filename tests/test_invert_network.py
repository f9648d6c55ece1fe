"""invert_network: the backward pass block by block to pixels, its report, its drivers; metrics and images."""

from __future__ import annotations

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peel_jax
from peel_jax import blocks, images, metrics, models
from peel_jax._certify import STATUSES
from peel_jax import NetworkConfig
from peel_jax.inversion.plan import invertible_layers
from peel_jax.problems.stem import pool_upper_bound
from peel_jax.cli import scale_branches

SIZE = 96
FAST = peel_jax.SolverConfig(max_iters=10, cg_iters=10)


@pytest.fixture(scope="module")
def photo96():
  """One bundled photo, ``(1, 96, 96, 3)``, ImageNet-normalised."""
  return jnp.asarray(images.normalize(images.bundled("astronaut", SIZE)))[None]


def _paper_net(x, gain):
  model = models.resnet18(**models.paper_variant())
  variables = model.init(jax.random.key(0), x)
  return model, scale_branches(variables, gain)


@pytest.fixture(scope="module")
def small_branches(photo96):
  """Paper-variant resnet18 with small residual branches (last conv scaled by 0.3)."""
  return _paper_net(photo96, 0.3)


def test_scale_branches_scales_the_last_conv_only(photo96):
  model, v = _paper_net(photo96, 1.0)
  s = scale_branches(v, 0.3)
  for name in ("layer1_0", "layer3_1"):
    np.testing.assert_allclose(s["params"][name]["conv2"]["kernel"], 0.3 * v["params"][name]["conv2"]["kernel"])
    np.testing.assert_allclose(s["params"][name]["conv2"]["bias"], 0.3 * v["params"][name]["conv2"]["bias"])
    np.testing.assert_array_equal(s["params"][name]["conv1"]["kernel"], v["params"][name]["conv1"]["kernel"])
  np.testing.assert_array_equal(s["params"]["conv1"]["kernel"], v["params"]["conv1"]["kernel"])


def test_small_branch_paper_network_from_layer1_recovers_the_photo(photo96, small_branches):
  model, v = small_branches
  feats = peel_jax.features(model, v, photo96)
  x_hat, report = peel_jax.invert_network(model, v, feats["layer1"], "layer1", image=photo96,
                                          config=NetworkConfig.blockwise(block=FAST, certify=True))
  assert x_hat.shape == photo96.shape
  assert [b.name for b in report.blocks] == ["layer1.1", "layer1.0", "stem"]
  assert report.psnr[0] >= 30.0, report.summary()
  assert report.ssim[0] > 0.99
  for b in report.blocks:
    assert b.input_rel_error[0] < 1e-3, (b.name, report.summary())
    assert b.converged.all()
  # The certificate is reported per block. (A 0.3 gain is not a Lipschitz certificate: a He 3x3 conv's spectral
  # norm is about 2.8, so the product bound is about 2.3 and the status stays 'unknown' without extra starts.)
  for b in report.blocks[:2]:
    assert all(s in STATUSES for s in b.certificate.status)
    assert np.isfinite(b.certificate.local_lipschitz).all() and np.isfinite(b.certificate.global_bound)
  d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
  assert {"psnr", "mse", "ssim", "seconds", "blocks", "observation_residual"} <= set(d)
  assert d["blocks"][0]["certificate"]["status"] in STATUSES
  assert report.observation_residual[0] < 1e-4


def test_he_scale_reports_psnr_and_determinacy(photo96):
  model, v = _paper_net(photo96, 1.0)
  feats = peel_jax.features(model, v, photo96)
  _, report = peel_jax.invert_network(model, v, feats["layer1"], "layer1", image=photo96,
                                      config=NetworkConfig.blockwise(block=FAST, certify=True))
  assert np.isfinite(report.psnr).all() and np.isfinite(report.ssim).all()
  for b in report.blocks[:2]:
    assert b.certificate is not None
    assert all(s in STATUSES for s in b.certificate.status)
    # At the He scale the branch is not certified to be a contraction.
    assert b.certificate.global_bound > 1.0
    assert b.certificate.status != ["determined"]
  assert report.blocks[-1].certificate is None  # the stem is not certified
  assert "PSNR" in report.summary()


def test_torchvision_network_report_matches_an_independent_recomputation(photo96):
  model = models.resnet18()
  v = model.init(jax.random.key(1), photo96)
  feats = peel_jax.features(model, v, photo96)
  y = feats["layer1"]
  x_hat, report = peel_jax.invert_network(model, v, y, "layer1", image=photo96, config=NetworkConfig.blockwise(block=FAST))
  assert bool(jnp.all(jnp.isfinite(x_hat)))
  assert report.stem_method == "bounded"
  est = report.estimates
  b11 = blocks.extract(model, v, "layer1.1")
  b10 = blocks.extract(model, v, "layer1.0")
  stem = blocks.extract(model, v, "stem")
  # Each block's residual is against the observation it was given: the deeper block's estimate.
  for blk, x_in, y_obs, name in ((b11, est["layer1.1"], y, "layer1.1"),
                                 (b10, est["layer1.0"], est["layer1.1"], "layer1.0"),
                                 (stem, x_hat, est["layer1.0"], "stem")):
    r = blk(x_in) - y_obs
    res = float(jnp.linalg.norm(r) / jnp.linalg.norm(y_obs))
    assert report.block(name).residual[0] == pytest.approx(res, rel=1e-3, abs=1e-6)
  err = float(jnp.linalg.norm(est["layer1.0"] - feats["maxpool"]) / jnp.linalg.norm(feats["maxpool"]))
  assert report.block("layer1.0").input_rel_error[0] == pytest.approx(err, rel=1e-4)
  err = float(jnp.linalg.norm(x_hat - photo96) / jnp.linalg.norm(photo96))
  assert report.block("stem").input_rel_error[0] == pytest.approx(err, rel=1e-4)
  a = np.clip(np.asarray(x_hat[0]) * images.IMAGENET_STD + images.IMAGENET_MEAN, 0, 1).astype(np.float64)
  o = np.clip(np.asarray(photo96[0]) * images.IMAGENET_STD + images.IMAGENET_MEAN, 0, 1).astype(np.float64)
  mse = np.mean((a - o) ** 2)
  assert report.mse[0] == pytest.approx(mse, rel=1e-4)
  assert report.psnr[0] == pytest.approx(10 * np.log10(1 / mse), rel=1e-4)
  obs = peel_jax.features(model, v, x_hat, "layer1")["layer1"]
  assert report.observation_residual[0] == pytest.approx(float(jnp.linalg.norm(obs - y) / jnp.linalg.norm(y)),
                                                         rel=1e-3)
  # The pixel box holds.
  lo, hi = images.pixel_box()
  xa = np.asarray(x_hat)
  assert (xa >= lo - 1e-5).all() and (xa <= hi + 1e-5).all()


def test_scan_and_loop_drivers_agree():
  # Tiny: small stem (3x3, stride 1, no pool), 32x32 input; resnet34's layer1 has two stacked blocks to scan.
  model = models.resnet34(small_stem=True, **models.paper_variant())
  x = jnp.asarray(images.normalize(np.stack([images.bundled("chelsea", 32), images.bundled("coffee", 32)])))
  v = scale_branches(model.init(jax.random.key(2), x), 0.3)
  y = peel_jax.features(model, v, x, "layer1")["layer1"]
  cfg = peel_jax.SolverConfig(max_iters=4, cg_iters=5)
  outs = {d: peel_jax.invert_network(model, v, y, "layer1", image=x, config=NetworkConfig.blockwise(block=cfg, driver=d))
          for d in ("loop", "scan")}
  (xl, rl), (xs, rs) = outs["loop"], outs["scan"]
  assert [b.name for b in rl.blocks] == [b.name for b in rs.blocks] == ["layer1.2", "layer1.1", "layer1.0", "stem"]
  for name in ("layer1.2", "layer1.1", "layer1.0"):
    np.testing.assert_allclose(rs.estimates[name], rl.estimates[name], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(rs.block(name).iterations, rl.block(name).iterations)
    np.testing.assert_allclose(rs.block(name).residual, rl.block(name).residual, rtol=1e-2, atol=1e-6)
  np.testing.assert_allclose(xs, xl, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(rs.psnr, rl.psnr, rtol=1e-2)


def test_unknown_layer_and_driver_are_refused(photo96, small_branches):
  model, v = small_branches
  with pytest.raises(KeyError, match="valid layers"):
    peel_jax.invert_network(model, v, jnp.zeros((1, 48, 48, 64)), "layer9")
  with pytest.raises(ValueError, match="driver"):
    peel_jax.invert_network(model, v, jnp.zeros((1, 48, 48, 64)), "layer1", config=NetworkConfig(driver="fast"))
  assert invertible_layers(model)[:4] == ["relu", "maxpool", "layer1", "layer1.0"]


def test_pool_upper_bound_is_tight_for_max_pool():
  r = jax.nn.relu(jax.random.normal(jax.random.key(3), (1, 10, 14, 4)))
  y = blocks.pool(r, "max")
  u = pool_upper_bound(y[0], (10, 14), "max")
  assert bool(jnp.all(r[0] <= u + 1e-7))  # every position is below every window covering it
  np.testing.assert_array_equal(blocks.pool(u[None], "max"), y)  # and the bound attains every window's max
  ya = blocks.pool(r, "avg")
  assert bool(jnp.all(r[0] <= pool_upper_bound(ya[0], (10, 14), "avg") + 1e-6))


# --- metrics and images ---------------------------------------------------------------------------------------------


def test_ssim_psnr_mse_match_scikit_image():
  from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

  rng = np.random.default_rng(0)
  a = images.bundled("astronaut", 40)[:, :33]
  b = np.clip(a + 0.08 * rng.normal(size=a.shape), 0, 1)
  ref = structural_similarity(b, a, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
  assert metrics.ssim(b, a) == pytest.approx(ref, rel=1e-9)
  assert metrics.psnr(b, a) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-9)
  assert metrics.mse(b, a) == pytest.approx(mean_squared_error(a, b), rel=1e-9)
  batch = metrics.image_metrics(np.stack([b, a]), np.stack([a, a]))
  assert batch["ssim"][1] == pytest.approx(1.0) and batch["psnr"][1] == np.inf
  assert batch["ssim"][0] == pytest.approx(ref, rel=1e-9)


def test_images_load_normalise_and_round_trip(tmp_path):
  for name in ("astronaut", "chelsea", "coffee", "grace_hopper", "lfw:3"):
    img = images.bundled(name, 48)
    assert img.shape == (48, 48, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
  img = images.bundled("grace_hopper", 64)
  np.testing.assert_allclose(images.denormalize(images.normalize(img)), img, atol=1e-6)
  lo, hi = images.pixel_box()
  np.testing.assert_allclose(images.normalize(np.zeros(3)), lo, atol=1e-6)
  np.testing.assert_allclose(images.normalize(np.ones(3)), hi, atol=1e-6)
  path = tmp_path / "a.png"
  images.save_png(path, img)
  np.testing.assert_allclose(images.load(path, 64), img, atol=1 / 255)
  bad = tmp_path / "bad.png"
  bad.write_text("not an image")
  with pytest.raises(images.ImageError, match="cannot read"):
    images.load(bad)
  with pytest.raises(images.ImageError, match="not found"):
    images.load(tmp_path / "missing.png")


def test_refinement_from_the_better_start_never_explains_the_observation_worse():
  """refine_start='best' picks, per image and from the observation alone, the start that reproduces it better."""
  x = jnp.asarray(images.normalize(np.stack([images.bundled(n, 32) for n in ("astronaut", "chelsea")])))
  model, v = _paper_net(x, 0.3)
  feats = peel_jax.features(model, v, x)
  _, report = peel_jax.invert_network(model, v, feats["layer2"], "layer2", image=x,
                                      config=NetworkConfig(block=FAST, refine_iters=3, refine_start="best", prior=None))
  blockwise = report.refine["blockwise"]
  assert set(report.refine["start"]) <= {"blockwise", "mahendran_vedaldi"}
  assert np.all(report.observation_residual <= blockwise["observation_residual"] * (1 + 1e-6))
  # Through the stride-2 layer2.0 the block-wise estimate is a preimage far from the image; the prior's start wins.
  assert report.refine["start"] == ["mahendran_vedaldi"] * 2
  assert np.all(report.psnr > blockwise["psnr"] + 5.0), (report.psnr, blockwise["psnr"])
  assert report.to_dict()["refine"]["start"] == ["mahendran_vedaldi"] * 2
  with pytest.raises(ValueError, match="refine_start"):
    peel_jax.invert_network(model, v, feats["layer2"], "layer2",
                            config=NetworkConfig(refine_iters=1, refine_start="magic"))


def test_no_prior_start_is_computed_where_the_blockwise_pass_is_exact(photo96, small_branches, monkeypatch):
  """refine_start='best' runs Mahendran-Vedaldi only if some block-wise estimate misses the refinement's tolerance:
  through the paper variant's small-branch layer1 the block-wise pass reproduces the observation to it."""
  mv_module = importlib.import_module("peel_jax.baselines.mahendran_vedaldi")  # the package exports the function

  def refuse(*args, **kwargs):
    raise AssertionError("the Mahendran-Vedaldi start was computed")

  monkeypatch.setattr(mv_module, "mahendran_vedaldi", refuse)
  model, v = small_branches
  feats = peel_jax.features(model, v, photo96)
  _, report = peel_jax.invert_network(model, v, feats["layer1"], "layer1", image=photo96,
                                      config=NetworkConfig(block=FAST, refine_iters=1, prior=None))
  assert report.refine["blockwise"]["observation_residual"][0] <= FAST.tol
  assert report.refine["start"] == ["blockwise"]


def test_default_prior_acts_exactly_where_the_counts_leave_the_image_underdetermined(photo96):
  """``prior='auto'`` (the default), on a one-block torchvision-style network at 96 px (27,648 pixel values): from
  the stem's ``relu`` (about 70,000 non-zero values) the refinement is prior-free, bit for bit as ``prior=None``;
  from ``layer1`` (about 18,000 non-zero of 36,864) it is the TV prior's, bit for bit as ``prior='tv'``. The report
  carries the counts."""
  model = models.ResNet(stage_sizes=(1,))
  v = model.init(jax.random.key(0), photo96)
  feats = peel_jax.features(model, v, photo96)
  run = lambda layer, prior: peel_jax.invert_network(
      model, v, feats[layer], layer, config=NetworkConfig(block=FAST, refine_iters=2, refine_start="blockwise",
                                                          prior=prior))
  for layer, same_as in (("relu", None), ("layer1", "tv")):
    nonzero = int(jnp.sum(feats[layer] != 0))
    x_auto, rep = run(layer, "auto")
    x_same, rep_same = run(layer, same_as)
    np.testing.assert_array_equal(x_auto, x_same)
    np.testing.assert_array_equal(rep.refine.with_prior, [same_as == "tv"])
    np.testing.assert_array_equal(rep.refine.with_prior, rep_same.refine.with_prior)
    np.testing.assert_array_equal(rep.informative_values, [nonzero])
    np.testing.assert_array_equal(rep.null_dim_bound, [max(0, 27648 - nonzero)])
    assert (nonzero < 27648) == (same_as == "tv"), nonzero
    assert rep.to_dict()["null_dim_bound"] == max(0, 27648 - nonzero)
  assert NetworkConfig() == NetworkConfig(refine_iters=200, refine_start="best", prior="auto")
  assert NetworkConfig.blockwise().refine_iters == 0 and NetworkConfig.blockwise().prior is None


def test_default_prior_acts_where_the_path_count_at_the_start_leaves_the_image_underdetermined(photo96):
  """A bottleneck stage at 96 px with 16 of its 64 stem channels alive: ``layer1`` has far more non-zero values than
  the 27,648 pixel values (the observation's count allows determinacy), but the max-pool before it has at most
  16 * 24 * 24 = 9,216, at the start as at every image; ``prior='auto'`` takes the TV prior, bit for bit as
  ``prior='tv'``."""
  model = models.ResNet(stage_sizes=(1,), block="bottleneck")
  v = model.init(jax.random.key(0), photo96)
  bn1 = dict(v["params"]["bn1"])
  bn1["bias"] = jnp.where(jnp.arange(64) < 16, bn1["bias"], -1e3)
  v = {**v, "params": {**v["params"], "bn1": bn1}}
  feats = peel_jax.features(model, v, photo96, ["maxpool", "layer1"])
  assert int(jnp.sum(feats["layer1"] != 0)) > 27648 and int(jnp.sum(feats["maxpool"] != 0)) <= 9216
  run = lambda prior: peel_jax.invert_network(
      model, v, feats["layer1"], "layer1", config=NetworkConfig(block=FAST, refine_iters=2, refine_start="blockwise",
                                                                prior=prior))
  (x_auto, rep), (x_tv, _) = run("auto"), run("tv")
  np.testing.assert_array_equal(rep.null_dim_bound, [0])
  np.testing.assert_array_equal(rep.refine.with_prior, [True])
  np.testing.assert_array_equal(x_auto, x_tv)


def test_prior_penalty_is_chosen_by_where_the_layer_is():
  """``prior_rho=None``: 100 where the window maxima are chosen, 0.1 past a max-pool, 10 elsewhere; a set value wins."""
  from peel_jax.inversion.network import _prior_rho

  tv, paper, cfg = models.resnet18(), models.resnet18(**models.paper_variant()), NetworkConfig()
  assert [_prior_rho(tv, l, cfg) for l in ("relu", "maxpool", "layer1", "layer3.1")] == [10.0, 100.0, 0.1, 0.1]
  assert [_prior_rho(paper, l, cfg) for l in ("relu", "layer1", "layer4")] == [10.0, 10.0, 10.0]
  assert _prior_rho(tv, "layer1", NetworkConfig(prior_rho=3.0)) == 3.0
