"""PyTorch references for every ResNet variant of :mod:`peel_jax.models`, written from torchvision's code.

:class:`ResNet` here is torchvision's ``ResNet`` (same ``_make_layer`` logic, same module names, so its default
configuration loads a torchvision state_dict strictly and computes the same thing), generalised with the variant
options of :class:`peel_jax.models.ResNet`. Every activation site is its own module, named as the Flax sites are,
so a PReLU slope gets the torch key the port expects: ``relu.weight`` (stem), ``layerK.J.act1.weight`` ...,
``act_final.weight`` (preact). A removed module becomes ``nn.Identity`` under the same name, so forward hooks see the
same feature names in every variant.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch
from torch import nn

import peel_jax
from peel_jax import port
from peel_jax._torch_compat import import_torchvision
from peel_jax.models import resnet as flax_resnet

torchvision = import_torchvision()

SEED = 20250410  # any fixed value

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def rel_err(ours, theirs) -> float:
  """max |ours - theirs| / max |theirs|."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


@functools.lru_cache(maxsize=None)
def photo_batch(size: int, n: int = 2) -> np.ndarray:
  """skimage's astronaut (and, for ``n=2``, the same photo mirrored), resized, ImageNet-normalised, NHWC float32."""
  import skimage.data
  import skimage.transform

  img = skimage.transform.resize(skimage.data.astronaut(), (size, size), anti_aliasing=True)  # float64 in [0, 1]
  imgs = [img, img[:, ::-1]][:n]
  x = (np.stack(imgs).astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
  return np.ascontiguousarray(x, np.float32)


# arch -> (block, layers, groups, width_per_group), as torchvision's builders.
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
}

# Variant options with a torch reference (name -> options of peel_jax.models.get_model).
VARIANTS = {
    "default": {},
    "no_bn": dict(batch_norm=False),
    "no_post_act": dict(post_activation=False),
    "stem_avg": dict(stem_pool="avg"),
    "stem_none": dict(stem_pool="none"),
    "leaky_relu": dict(activation="leaky_relu"),
    "prelu": dict(activation="prelu"),
    "gelu": dict(activation="gelu"),
    "small_stem": dict(small_stem=True, stem_pool="none"),
    "preact": dict(preact=True),
    "preact_prelu_no_bn": dict(preact=True, activation="prelu", batch_norm=False),
    "paper": flax_resnet.paper_variant(),
    "paper_prelu": flax_resnet.paper_variant(activation="prelu"),
}
VARIANT_CASES = [("resnet18", k) for k in VARIANTS] + [
    ("resnet50", k) for k in ("default", "no_bn", "prelu", "gelu", "paper_prelu")
]


def variant_size(name: str) -> int:
  return 32 if name == "small_stem" else 96  # the small stem is for 32x32-class inputs


def make_activation(kind: str) -> nn.Module:
  if kind == "relu":
    return nn.ReLU()
  if kind == "leaky_relu":
    return nn.LeakyReLU(0.01)
  if kind == "prelu":
    return nn.PReLU()  # one slope, torch's default
  if kind == "gelu":
    return nn.GELU()  # exact erf form
  raise ValueError(kind)


def _conv(cin, cout, k, stride=1, *, bias, groups=1):
  return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


def _bn(c, on):
  return nn.BatchNorm2d(c) if on else nn.Identity()


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample, *, batch_norm, post_activation, activation, groups,
               base_width):
    super().__init__()
    bias = not batch_norm
    self.conv1 = _conv(inplanes, planes, 3, stride, bias=bias)
    self.bn1 = _bn(planes, batch_norm)
    self.act1 = make_activation(activation)
    self.conv2 = _conv(planes, planes, 3, bias=bias)
    self.bn2 = _bn(planes, batch_norm)
    if downsample:
      self.downsample = nn.Sequential(_conv(inplanes, planes, 1, stride, bias=bias), _bn(planes, batch_norm))
    else:
      self.downsample = None
    self.act2 = make_activation(activation) if post_activation else None

  def forward(self, x):
    out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
    identity = x if self.downsample is None else self.downsample(x)
    out = out + identity
    return out if self.act2 is None else self.act2(out)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride, downsample, *, batch_norm, post_activation, activation, groups,
               base_width):
    super().__init__()
    bias = not batch_norm
    width = int(planes * (base_width / 64.0)) * groups
    self.conv1 = _conv(inplanes, width, 1, bias=bias)
    self.bn1 = _bn(width, batch_norm)
    self.act1 = make_activation(activation)
    self.conv2 = _conv(width, width, 3, stride, bias=bias, groups=groups)
    self.bn2 = _bn(width, batch_norm)
    self.act2 = make_activation(activation)
    self.conv3 = _conv(width, planes * 4, 1, bias=bias)
    self.bn3 = _bn(planes * 4, batch_norm)
    if downsample:
      self.downsample = nn.Sequential(_conv(inplanes, planes * 4, 1, stride, bias=bias), _bn(planes * 4, batch_norm))
    else:
      self.downsample = None
    self.act3 = make_activation(activation) if post_activation else None

  def forward(self, x):
    out = self.act1(self.bn1(self.conv1(x)))
    out = self.act2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    out = out + identity
    return out if self.act3 is None else self.act3(out)


class PreActBlock(nn.Module):
  """He et al. 2016, identity mappings: ``h = act0(bn0(x))``, ``y = S(h) + conv2(act1(bn1(conv1(h))))``."""

  expansion = 1

  def __init__(self, inplanes, planes, stride, downsample, *, batch_norm, post_activation, activation, groups,
               base_width):
    super().__init__()
    bias = not batch_norm
    self.bn0 = _bn(inplanes, batch_norm)
    self.act0 = make_activation(activation)
    self.conv1 = _conv(inplanes, planes, 3, stride, bias=bias)
    self.bn1 = _bn(planes, batch_norm)
    self.act1 = make_activation(activation)
    self.conv2 = _conv(planes, planes, 3, bias=bias)
    # The projection shortcut is a bare 1x1 convolution of h.
    self.downsample = nn.Sequential(_conv(inplanes, planes, 1, stride, bias=bias)) if downsample else None

  def forward(self, x):
    h = self.act0(self.bn0(x))
    out = self.conv2(self.act1(self.bn1(self.conv1(h))))
    identity = x if self.downsample is None else self.downsample(h)
    return out + identity


class ResNet(nn.Module):
  """torchvision's ResNet with the variant options of :class:`peel_jax.models.ResNet`."""

  def __init__(self, block="basic", layers=(2, 2, 2, 2), num_classes=1000, groups=1, width_per_group=64, *,
               batch_norm=True, post_activation=True, stem_pool="max", activation="relu", small_stem=False,
               preact=False):
    super().__init__()
    block_cls = PreActBlock if preact else {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
    self.block_kw = dict(batch_norm=batch_norm, post_activation=post_activation, activation=activation,
                         groups=groups, base_width=width_per_group)
    self.inplanes = 64
    if small_stem:
      self.conv1 = _conv(3, 64, 3, 1, bias=not batch_norm)
    else:
      self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=not batch_norm)
    self.bn1 = _bn(64, batch_norm)
    self.relu = make_activation(activation)
    self.maxpool = {
        "max": lambda: nn.MaxPool2d(3, 2, 1),
        "avg": lambda: nn.AvgPool2d(3, 2, 1),  # count_include_pad=True, torch's default
        "none": nn.Identity,
    }[stem_pool]()
    self.layer1 = self._make_layer(block_cls, 64, layers[0])
    self.layer2 = self._make_layer(block_cls, 128, layers[1], stride=2)
    self.layer3 = self._make_layer(block_cls, 256, layers[2], stride=2)
    self.layer4 = self._make_layer(block_cls, 512, layers[3], stride=2)
    self.preact = preact
    if preact:
      self.bn_final = _bn(512 * block_cls.expansion, batch_norm)
      self.act_final = make_activation(activation)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(512 * block_cls.expansion, num_classes)

  def _make_layer(self, block_cls, planes, blocks, stride=1):
    downsample = stride != 1 or self.inplanes != planes * block_cls.expansion
    layers = [block_cls(self.inplanes, planes, stride, downsample, **self.block_kw)]
    self.inplanes = planes * block_cls.expansion
    for _ in range(1, blocks):
      layers.append(block_cls(self.inplanes, planes, 1, False, **self.block_kw))
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    if self.preact:
      x = self.act_final(self.bn_final(x))
    x = torch.flatten(self.avgpool(x), 1)
    return self.fc(x)


def reference(arch: str = "resnet18", **variant) -> ResNet:
  """The torch reference of ``peel_jax.models.get_model(arch, **variant)``."""
  block, layers, groups, width = ARCHS[arch]
  num_classes = variant.pop("num_classes", 1000)
  return ResNet(block, layers, num_classes, groups, width, **variant).eval()


def torchvision_model(arch: str, **kwargs) -> nn.Module:
  """torchvision's own ``arch`` with no pretrained weights."""
  return getattr(torchvision.models, arch)(weights=None, **kwargs).eval()


def randomize(model: nn.Module, seed: int, gain: float = 1.0) -> nn.Module:
  """Randomises every parameter and BatchNorm statistic of ``model`` in place, keeping activations O(1).

  ``gain=1`` (not He's sqrt(2)) so the residual stream stays O(1) through resnet50's 16 blocks, BatchNorm's random
  statistics normalising nothing; features then peak at max-abs 3 to 50 on the photo.

  Conv/linear weights ``N(0, 1) * gain / sqrt(fan_in)``, biases ``N(0, 0.1)``; BatchNorm weight ``U(0.5, 1.5)``, bias
  ``N(0, 0.1)``, running_mean ``N(0, 0.1)``, running_var ``U(0.5, 1.5)``; PReLU slopes ``U(0.05, 0.5)`` (a different
  one per site).
  """
  g = torch.Generator().manual_seed(seed)

  def normal(t, std):
    t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * std)

  def uniform(t, lo, hi):
    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=t.dtype))

  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        normal(m.weight, gain / math.sqrt(m.weight[0].numel()))
        if m.bias is not None:
          normal(m.bias, 0.1)
      elif isinstance(m, nn.BatchNorm2d):
        uniform(m.weight, 0.5, 1.5)
        normal(m.bias, 0.1)
        normal(m.running_mean, 0.1)
        uniform(m.running_var, 0.5, 1.5)
      elif isinstance(m, nn.PReLU):
        uniform(m.weight, 0.05, 0.5)
  return model


def to_nchw(x_nhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2)))


def torch_features(model: nn.Module, x_nhwc: np.ndarray, names) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Forward hooks on the modules ``names``: ``({name: NHWC / (N, C) array}, logits)``.

  Outputs are cloned in the hook: torchvision's ReLU is in place and would overwrite ``bn1``.
  """
  modules = dict(model.named_modules())
  outs = {}
  handles = [
      modules[n].register_forward_hook(lambda mod, inp, out, n=n: outs.__setitem__(n, out.detach().clone()))
      for n in names
  ]
  try:
    with torch.no_grad():
      logits = model(to_nchw(x_nhwc))
  finally:
    for h in handles:
      h.remove()
  feats = {}
  for n, t in outs.items():
    a = t.numpy()
    if a.ndim == 4:
      a = a.transpose(0, 2, 3, 1) if n != "avgpool" else a.reshape(a.shape[0], -1)
    feats[n] = np.ascontiguousarray(a)
  return feats, logits.numpy()


@dataclasses.dataclass
class Ported:
  """A randomised torch network and its Flax port, with features of both on the same input."""

  arch: str
  variant: dict
  torch_model: nn.Module
  state_dict: dict
  model: flax_resnet.ResNet
  variables: dict
  x: np.ndarray
  torch_feats: dict
  torch_logits: np.ndarray
  flax_feats: dict

  def worst_rel_err(self) -> tuple[str, float]:
    errs = {n: rel_err(self.flax_feats[n], self.torch_feats[n]) for n in self.torch_feats}
    errs["logits"] = rel_err(self.flax_feats["fc"], self.torch_logits)
    name = max(errs, key=errs.get)
    return name, errs[name]


def port_and_compare(torch_model, source, arch, x, **variant) -> Ported:
  """Ports ``source`` (path or mapping) with ``from_torchvision`` and computes features of both networks on ``x``."""
  model = flax_resnet.get_model(arch, **variant)
  variables = port.from_torchvision(source, arch, **variant)
  names = peel_jax.feature_names(model)
  torch_feats, logits = torch_features(torch_model, x, names)
  flax_feats = {k: np.asarray(v) for k, v in peel_jax.features(model, variables, x).items()}
  return Ported(arch, dict(variant), torch_model, torch_model.state_dict(), model, variables, x, torch_feats, logits,
                flax_feats)


@functools.lru_cache(maxsize=None)
def _ported(arch, size, n, seed, variant_items):
  variant = dict(variant_items)
  torch_model = randomize(reference(arch, **variant), seed)
  x = photo_batch(size, n)
  return port_and_compare(torch_model, torch_model.state_dict(), arch, x, **variant)


def ported(arch: str = "resnet18", size: int = 96, n: int = 2, seed: int = SEED, **variant) -> Ported:
  """Cached :func:`port_and_compare` of a randomised :func:`reference` network on the photo batch."""
  return _ported(arch, size, n, seed, tuple(sorted(variant.items())))


def ported_case(arch: str, name: str) -> Ported:
  """:func:`ported` for the variant ``VARIANTS[name]`` at its input size."""
  return ported(arch, size=variant_size(name), **VARIANTS[name])
