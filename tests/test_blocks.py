"""Folded blocks (peel_jax.blocks) reproduce the model's own blocks; stages, the stem, BatchNorm folding, specs."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import torch_reference as tr
from peel_jax import blocks
from peel_jax.models.resnet import BN_EPS
from torch_reference import rel_err

TOL = 1e-5

# name -> (arch, torch_reference.VARIANTS key)
CASES = {
    "resnet18": ("resnet18", "default"),
    "resnet50": ("resnet50", "default"),
    "preact": ("resnet18", "preact"),
    "paper": ("resnet18", "paper"),
    "prelu": ("resnet18", "prelu"),
    "resnet50_paper_prelu": ("resnet50", "paper_prelu"),
    "preact_prelu_no_bn": ("resnet18", "preact_prelu_no_bn"),
}


def case(name) -> tr.Ported:
  return tr.ported_case(*CASES[name])


def previous(model, name: str) -> str:
  """The feature that feeds block ``name``."""
  order = ["maxpool"] + model.block_names()
  return order[order.index(name) - 1]


@pytest.mark.parametrize("name", CASES)
def test_blocks_reproduce_the_model(name, record_rel_error):
  p = case(name)
  f, model = p.flax_feats, p.model
  worst = 0.0
  for bname in model.block_names():
    block = blocks.extract(model, p.variables, bname)
    assert isinstance(block, blocks.Block) and block.spec.name == bname
    x = f[previous(model, bname)]
    y = block(x)
    err = rel_err(y, f[bname])
    assert err < TOL, (bname, err)
    worst = max(worst, err)
    # The spec's shapes and stride describe the block.
    assert block.spec.in_channels == x.shape[-1] and block.spec.out_channels == y.shape[-1]
    assert block.output_shape(x.shape) == y.shape
    assert block.input_shape(y.shape) == x.shape
  record_rel_error(f"blocks {name}", worst)


STEM_CASES = [c for c in tr.VARIANT_CASES if c[0] == "resnet18"]


@pytest.mark.parametrize("arch,variant", STEM_CASES, ids=[v for _, v in STEM_CASES])
def test_stem_reproduces_maxpool(arch, variant):
  p = tr.ported_case(arch, variant)
  stem = blocks.extract(p.model, p.variables, "stem")
  assert stem.spec.kind == "stem" and stem.spec.name == "stem"
  y = stem(p.x)
  assert rel_err(y, p.flax_feats["maxpool"]) < TOL
  assert stem.spec.stride == p.x.shape[1] // y.shape[1]
  assert stem.input_shape(y.shape) == p.x.shape


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "preact", "prelu"])
def test_stage_scan_equals_blocks(name):
  p = case(name)
  f, model = p.flax_feats, p.model
  for s, depth in enumerate(model.stage_sizes):
    stage = blocks.extract(model, p.variables, f"layer{s + 1}")
    assert isinstance(stage, blocks.Stage) and stage.name == f"layer{s + 1}" and stage.depth == depth
    unstacked = stage.blocks()
    assert len(unstacked) == depth
    for i, b in enumerate(unstacked):  # the stacked blocks are the blocks
      single = blocks.extract(model, p.variables, f"layer{s + 1}.{i}")
      assert b.spec.kind == single.spec.kind and b.spec.input_nonneg == single.spec.input_nonneg
      jax.tree.map(np.testing.assert_array_equal, b.params, single.params)
    x = f[previous(model, f"layer{s + 1}.0")]
    by_blocks = x
    for b in unstacked:
      by_blocks = b(by_blocks)
    scanned = stage(x)
    assert rel_err(scanned, by_blocks) < 1e-6
    assert rel_err(scanned, f[f"layer{s + 1}"]) < TOL


@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_batchnorm(rng, with_bias):
  cin, cout = 5, 7
  kernel = rng.normal(size=(3, 3, cin, cout)).astype(np.float32)
  conv = {"kernel": kernel}
  bias = rng.normal(size=cout).astype(np.float32) if with_bias else np.zeros(cout, np.float32)
  if with_bias:
    conv["bias"] = bias
  bn = {"scale": rng.uniform(0.5, 1.5, cout).astype(np.float32), "bias": rng.normal(size=cout).astype(np.float32)}
  stats = {"mean": rng.normal(size=cout).astype(np.float32), "var": rng.uniform(0.1, 2.0, cout).astype(np.float32)}
  x = rng.normal(size=(2, 9, 9, cin)).astype(np.float32)

  y = lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = np.asarray(y, np.float64) + bias
  direct = (y - stats["mean"]) / np.sqrt(stats["var"].astype(np.float64) + BN_EPS) * bn["scale"] + bn["bias"]

  folded = blocks.fold_batchnorm(conv, bn, stats)
  assert folded["kernel"].shape == kernel.shape and folded["bias"].shape == (cout,)
  assert rel_err(blocks.conv_affine(jnp.asarray(x), folded, stride=2), direct) < 1e-6

  plain = blocks.fold_batchnorm(conv, None, None)  # no BatchNorm: the convolution itself, bias or zeros
  np.testing.assert_array_equal(plain["kernel"], kernel)
  np.testing.assert_array_equal(plain["bias"], bias)


# name -> the blocks whose input the architecture guarantees >= 0 ("all": every block)
NONNEG = {
    ("resnet18", "default"): "all",
    ("resnet50", "default"): "all",
    ("resnet18", "no_bn"): "all",
    ("resnet18", "stem_avg"): "all",
    ("resnet18", "stem_none"): "all",
    ("resnet18", "small_stem"): "all",
    ("resnet18", "no_post_act"): {"layer1.0"},
    ("resnet18", "paper"): {"layer1.0"},
    ("resnet18", "preact"): {"layer1.0"},
    ("resnet18", "leaky_relu"): set(),
    ("resnet18", "gelu"): set(),
    ("resnet18", "prelu"): set(),
    ("resnet18", "paper_prelu"): set(),
}


@pytest.mark.parametrize("arch,variant", NONNEG, ids=[f"{a}-{v}" for a, v in NONNEG])
def test_input_nonneg(arch, variant):
  """``input_nonneg`` is True exactly where the input is provably >= 0; there the actual input is >= 0, elsewhere
  the actual input (random weights, a photo) does go negative."""
  p = tr.ported_case(arch, variant)
  names = p.model.block_names()
  want = set(names) if NONNEG[arch, variant] == "all" else NONNEG[arch, variant]
  assert blocks.extract(p.model, p.variables, "stem").spec.input_nonneg is False  # a normalised image
  assert p.x.min() < 0
  for bname in names:
    spec = blocks.extract(p.model, p.variables, bname).spec
    x = p.flax_feats[previous(p.model, bname)]
    assert spec.input_nonneg is (bname in want), bname
    assert bool(x.min() >= 0) is (bname in want), (bname, float(x.min()))
  for s in range(len(p.model.stage_sizes)):
    stage = blocks.extract(p.model, p.variables, f"layer{s + 1}")
    assert stage.first.spec.input_nonneg is (f"layer{s + 1}.0" in want)
    assert stage.rest.spec.input_nonneg is (f"layer{s + 1}.1" in want)


VALID18 = ("stem, layer1, layer2, layer3, layer4, layer1.0, layer1.1, layer2.0, layer2.1, layer3.0, layer3.1, "
           "layer4.0, layer4.1")


@pytest.mark.parametrize("bad", ["layer5", "layer0", "layer1.2", "layer0.0", "layer5.0", "layer1.-1", "layer1.0.conv1",
                                 "layerx", "layer", "stem.0", "fc", "conv1", ""])
def test_unknown_block_names(bad):
  p = case("resnet18")
  with pytest.raises(KeyError, match=re.escape(f"unknown block {bad!r}; valid names: {VALID18}")):
    blocks.extract(p.model, p.variables, bad)


def test_extract_reports_real_errors():
  """A valid block name whose variables are broken is not reported as an unknown name."""
  p = case("resnet18")
  params = {**p.variables["params"]}
  params["layer1_0"] = {k: v for k, v in params["layer1_0"].items() if k != "conv1"}
  with pytest.raises(KeyError, match="lack convolution 'conv1'"):
    blocks.extract(p.model, {**p.variables, "params": params}, "layer1.0")


@pytest.mark.parametrize("name", ["resnet18", "prelu", "preact"])
def test_block_is_a_jittable_pytree(name):
  p = case(name)
  block = blocks.extract(p.model, p.variables, "layer2.0")
  leaves, treedef = jax.tree.flatten(block)
  assert leaves and all(isinstance(a, jax.Array) for a in leaves)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert isinstance(rebuilt, blocks.Block) and rebuilt.spec == block.spec
  hash(block.spec)  # static, hashable
  x = jnp.asarray(p.flax_feats["layer1"])
  eager = block(x)
  jitted = jax.jit(lambda b, x: b(x))(block, x)
  assert rel_err(jitted, eager) < 1e-6
  # The params are traced arguments, not constants: other params, same compiled function, other output.
  doubled = jax.tree.map(lambda a: 2 * a, block)
  assert isinstance(doubled, blocks.Block) and doubled.spec == block.spec
  assert rel_err(jax.jit(lambda b, x: b(x))(doubled, x), eager) > 1e-3
  stage = blocks.extract(p.model, p.variables, "layer2")
  assert rel_err(jax.jit(lambda s, x: s(x))(stage, x), p.flax_feats["layer2"]) < TOL


@pytest.mark.parametrize("name", ["resnet18", "preact", "preact_prelu_no_bn", "resnet50_paper_prelu"])
def test_forward_from_a_layer_gives_the_logits(name, record_rel_error):
  p = case(name)
  f, model = p.flax_feats, p.model
  worst = 0.0
  for layer in ("maxpool", "layer1", "layer2.0", "layer3", model.block_names()[-1]):
    logits = blocks.forward_from(model, p.variables, f[layer], layer)
    err = rel_err(logits, f["fc"])
    assert err < TOL, (layer, err)
    worst = max(worst, err)
  record_rel_error(f"blocks forward_from {name}", worst)
  with pytest.raises(KeyError, match="valid layers: maxpool, layer1"):
    blocks.forward_from(model, p.variables, f["layer1"], "layer9")
