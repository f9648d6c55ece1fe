"""The Flax ResNets compute what torchvision (and the torch references of the variants) compute, feature by feature."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import peel_jax
import torch_reference as tr
from peel_jax import models, port
from torch_reference import VARIANT_CASES, VARIANTS, rel_err

TOL = 1e-5  # relative error: max-abs difference / max-abs of the torch tensor, float32

RESNET18_FEATURES = [
    "conv1", "bn1", "relu", "maxpool",
    "layer1.0", "layer1.1", "layer1", "layer2.0", "layer2.1", "layer2",
    "layer3.0", "layer3.1", "layer3", "layer4.0", "layer4.1", "layer4",
    "avgpool", "fc",
]


def assert_features_match(p: tr.Ported, record, label: str):
  """Every feature of ``p`` and the logits agree with torch to :data:`TOL`; records the worst error."""
  names = peel_jax.feature_names(p.model)
  assert list(p.flax_feats) == names
  assert set(p.torch_feats) == set(names)
  errs = {n: rel_err(p.flax_feats[n], p.torch_feats[n]) for n in names}
  errs["logits"] = rel_err(p.flax_feats["fc"], p.torch_logits)
  worst = max(errs, key=errs.get)
  record(label, errs[worst])
  bad = {n: f"{e:.2e}" for n, e in errs.items() if not e < TOL}
  assert not bad, f"{label}: features off by >= {TOL} (worst {worst}): {bad}"
  # The comparison is not vacuous: the randomised network keeps activations O(1) and the logits vary.
  for n in names:
    scale = np.max(np.abs(p.torch_feats[n]))
    assert 1e-2 < scale < 1e3, (n, scale)
  assert np.std(p.torch_logits) > 1e-2


# --- torchvision itself ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_resnet_matches(arch, tmp_path, photo, seed, record_rel_error):
  tv = tr.randomize(tr.torchvision_model(arch), seed)
  path = tmp_path / "w.pth"
  torch.save(tv.state_dict(), path)
  p = tr.port_and_compare(tv, path, arch, photo)
  assert_features_match(p, record_rel_error, f"torchvision {arch}")
  # torchvision's ReLU is in place: the hooks must have cloned bn1 before it was overwritten.
  assert p.torch_feats["bn1"].min() < 0 <= p.torch_feats["relu"].min()
  np.testing.assert_array_equal(p.flax_feats["layer4"], p.flax_feats[f"layer4.{p.model.stage_sizes[3] - 1}"])


@pytest.mark.parametrize("arch", ["wide_resnet50_2", "resnext50_32x4d"])
def test_torchvision_wide_and_grouped_match(arch, photo_factory, seed, record_rel_error):
  """The two big ones, on a single image; ported from a mapping of torch tensors, then round-tripped.

  96x96, not 64x64: at 64 layer4 is 2x2, where this jaxlib's 3x3 convolutions are pathologically slow.
  """
  tv = tr.randomize(tr.torchvision_model(arch), seed)
  p = tr.port_and_compare(tv, tv.state_dict(), arch, photo_factory(96, 1))
  assert_features_match(p, record_rel_error, f"torchvision {arch}")
  back = port.from_torchvision(port.to_torchvision(p.variables, arch), arch)
  jax.tree.map(np.testing.assert_array_equal, back, p.variables)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_reference_is_torchvision(arch, photo, seed):
  """The torch reference with default options is torchvision's network: same keys (strict load), same features."""
  tv = tr.randomize(tr.torchvision_model(arch), seed)
  ref = tr.reference(arch)
  ref.load_state_dict(tv.state_dict(), strict=True)
  names = peel_jax.feature_names(models.get_model(arch))
  f_tv, logits_tv = tr.torch_features(tv, photo, names)
  f_ref, logits_ref = tr.torch_features(ref, photo, names)
  for n in names:
    np.testing.assert_array_equal(f_ref[n], f_tv[n], err_msg=n)
  np.testing.assert_array_equal(logits_ref, logits_tv)


# --- every variant against its torch reference ----------------------------------------------------------------------

@pytest.mark.parametrize("arch,name", VARIANT_CASES, ids=[f"{a}-{n}" for a, n in VARIANT_CASES])
def test_variant_state_dict_keys(arch, name):
  """The torch reference defines exactly the keys and shapes that ``port.expected_keys`` asks for."""
  ref = tr.reference(arch, **VARIANTS[name])
  found = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
  assert found == port.expected_keys(models.get_model(arch, **VARIANTS[name]))


@pytest.mark.parametrize("arch,name", VARIANT_CASES, ids=[f"{a}-{n}" for a, n in VARIANT_CASES])
def test_variant_matches_torch_reference(arch, name, record_rel_error):
  p = tr.ported_case(arch, name)
  assert_features_match(p, record_rel_error, f"reference {arch} {name}")


def test_options_change_the_function(photo):
  """Same weights, another option: another function (an option the model silently ignored would be caught)."""
  p = tr.ported_case("resnet18", "default")
  f0 = p.flax_feats["layer1.1"]
  for kw in (dict(post_activation=False), dict(stem_pool="avg"), dict(activation="gelu")):
    f1 = peel_jax.features(models.resnet18(**kw), p.variables, photo, "layer1.1")["layer1.1"]
    assert rel_err(f1, f0) > 1e-3, kw


# --- features() -----------------------------------------------------------------------------------------------------


def test_feature_names():
  assert peel_jax.feature_names(models.resnet18()) == RESNET18_FEATURES
  assert peel_jax.feature_names(models.resnet18(**models.paper_variant())) == RESNET18_FEATURES
  names50 = peel_jax.feature_names(models.resnet50())
  assert len(names50) == 4 + (3 + 4 + 6 + 3) + 4 + 2
  assert names50[-4:] == ["layer4.2", "layer4", "avgpool", "fc"]


def test_features_all_one_and_some(photo):
  p = tr.ported_case("resnet18", "default")
  all_feats = peel_jax.features(p.model, p.variables, photo, names=None)
  assert list(all_feats) == RESNET18_FEATURES
  shapes = {n: a.shape for n, a in all_feats.items()}
  assert shapes["conv1"] == shapes["bn1"] == shapes["relu"] == (2, 48, 48, 64)
  assert shapes["maxpool"] == shapes["layer1.0"] == (2, 24, 24, 64)
  assert shapes["layer4"] == (2, 3, 3, 512)
  assert shapes["avgpool"] == (2, 512) and shapes["fc"] == (2, 1000)
  one = peel_jax.features(p.model, p.variables, photo, "layer2.1")
  assert list(one) == ["layer2.1"]
  np.testing.assert_array_equal(one["layer2.1"], all_feats["layer2.1"])
  some = peel_jax.features(p.model, p.variables, photo, ["fc", "maxpool"])
  assert list(some) == ["fc", "maxpool"]
  np.testing.assert_array_equal(some["fc"], p.model.apply(p.variables, photo))


def test_features_unknown_name(photo):
  p = tr.ported_case("resnet18", "default")
  with pytest.raises(KeyError, match=re.escape("unknown feature name(s) ['layer5.0']")) as info:
    peel_jax.features(p.model, p.variables, photo, ["layer1", "layer5.0"])
  msg = str(info.value)
  assert "valid names: " + ", ".join(RESNET18_FEATURES) in msg
  with pytest.raises(KeyError, match="layer1.2"):
    peel_jax.features(p.model, p.variables, photo, "layer1.2")


# --- model construction ---------------------------------------------------------------------------------------------


def _init_shapes(model, size=32, channels=3):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, channels), jnp.float32))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="swish"), "unknown activation 'swish'"),
        (dict(stem_pool="min"), "unknown stem_pool 'min'"),
        (dict(small_stem=True), "small_stem=True has no stem pooling"),
    ],
)
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    _init_shapes(models.resnet18(**kwargs))


def test_bad_arch_and_input():
  with pytest.raises(ValueError, match="unknown arch 'resnet9'"):
    models.get_model("resnet9")
  with pytest.raises(ValueError, match="preact=True is implemented for basic blocks only"):
    _init_shapes(models.resnet50(preact=True))
  with pytest.raises(ValueError, match=re.escape("expected NHWC images with 3 channels, got shape (1, 32, 32, 1)")):
    _init_shapes(models.resnet18(), channels=1)


def test_rank_promotion_is_strict():
  """conftest's strict mode is on: an implicit (N, C) + (C,) broadcast raises."""
  with pytest.raises(ValueError, match="rank_promotion"):
    jnp.ones((2, 3)) + jnp.ones((3,))
