"""Flax ResNets that compute exactly what torchvision's ResNets compute.

Layout conventions (fixed, relied on by :mod:`peel_jax.port` and :mod:`peel_jax.blocks`):

* Input and activations are NHWC float32; torchvision is NCHW, the port transposes weights.
* BatchNorm runs in inference mode (running statistics), ``epsilon=1e-5`` as in torch.
* Every convolution pads symmetrically by ``kernel // 2`` (torchvision's padding). Flax's ``'SAME'`` pads
  asymmetrically for stride 2 and would not match.
* torchvision v1.5 bottleneck: the stride sits on the 3x3 convolution.
* Submodule names mirror torchvision's state_dict keys, with ``.`` replaced by ``_`` where Flax needs a single
  name (``layer2_0`` for ``layer2.0``, ``downsample_0`` for ``downsample.0``).
* Every intermediate output is sown into the ``'intermediates'`` collection (one dict, ``features``) under
  torchvision's module name
  (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1.0`` ... ``layer4``, ``avgpool``, ``fc``), so
  :func:`peel_jax.features` can return them. A variant that removes a module keeps its name for the slot (the
  ``maxpool`` slot holds the stem output when there is no pool; ``bn1`` equals ``conv1`` without BatchNorm), so
  feature names are the same for every variant.

Variants (keyword options, all default to torchvision):

* ``batch_norm=False``: no BatchNorm; every convolution then has a bias (the paper's block).
* ``post_activation=False``: no activation after the residual addition (the paper's block).
* ``stem_pool='max' | 'avg' | 'none'``: the stem's 3x3/2 pooling (avg uses ``count_include_pad=True``, torch's
  default).
* ``activation='relu' | 'leaky_relu' | 'prelu' | 'gelu'``: every activation of the network (gelu is the exact
  erf form, torch's default; prelu has one learnable slope per activation site, initialised at 0.25 as in torch).
* ``small_stem=True``: a 3x3 stride-1 stem convolution with no pooling, for 32x32-class inputs.
* ``preact=True``: pre-activation basic blocks (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016):
  ``h = act(bn0(x))``, ``y = S(h) + conv2(act(bn1(conv1(h))))`` with ``S`` the identity on ``x`` or a 1x1
  projection of ``h``; a final ``bn_final`` + activation precedes the pooling.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = ("relu", "leaky_relu", "prelu", "gelu")
STEM_POOLS = ("max", "avg", "none")
BN_EPS = 1e-5


def activation_fn(kind: str, negative_slope: float = 0.01, slope: jax.Array | None = None):
  """Returns the elementwise activation ``kind`` as a function of an array.

  Args:
    kind: one of :data:`ACTIVATIONS`.
    negative_slope: slope of ``leaky_relu`` for negative inputs.
    slope: the learned slope of ``prelu`` (scalar or per channel).
  """
  if kind == "relu":
    return jax.nn.relu
  if kind == "leaky_relu":
    return lambda u: jnp.where(u >= 0, u, negative_slope * u)
  if kind == "prelu":
    if slope is None:
      raise ValueError("prelu needs its learned slope")
    def prelu(u):
      s = jnp.asarray(slope, u.dtype)
      return jnp.where(u >= 0, u, jnp.reshape(s, (1,) * (u.ndim - s.ndim) + s.shape) * u)

    return prelu
  if kind == "gelu":
    return functools.partial(jax.nn.gelu, approximate=False)
  raise ValueError(f"unknown activation {kind!r}; expected one of {ACTIVATIONS}")


class Activation(nn.Module):
  """An activation site; ``prelu`` owns a learnable slope named ``weight`` (torch's name)."""

  kind: str = "relu"
  negative_slope: float = 0.01

  @nn.compact
  def __call__(self, x):
    slope = None
    if self.kind == "prelu":
      slope = self.param("weight", nn.initializers.constant(0.25), (1,), jnp.float32)
    return activation_fn(self.kind, self.negative_slope, slope)(x)


def stem_max_pool(x: jax.Array) -> jax.Array:
  """The stem's max-pool of ``(N, H, W, C)``: 3x3 windows, stride 2, padding 1 (torch's ``MaxPool2d(3, 2, 1)``)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _conv(features, kernel, stride, name, *, bias, groups=1):
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=bias,
      feature_group_count=groups,
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
      name=name,
  )


def _bn(name):
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=BN_EPS, name=name)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock (expansion 1), with the paper's variant options."""

  planes: int
  stride: int = 1
  downsample: bool = False
  batch_norm: bool = True
  post_activation: bool = True
  activation: str = "relu"
  negative_slope: float = 0.01
  groups: int = 1
  base_width: int = 64
  expansion = 1

  @nn.compact
  def __call__(self, x):
    nobias = self.batch_norm
    act = functools.partial(Activation, self.activation, self.negative_slope)
    out = _conv(self.planes, 3, self.stride, "conv1", bias=not nobias)(x)
    if self.batch_norm:
      out = _bn("bn1")(out)
    out = act(name="act1")(out)
    out = _conv(self.planes, 3, 1, "conv2", bias=not nobias)(out)
    if self.batch_norm:
      out = _bn("bn2")(out)
    identity = x
    if self.downsample:
      identity = _conv(self.planes, 1, self.stride, "downsample_0", bias=not nobias)(x)
      if self.batch_norm:
        identity = _bn("downsample_1")(identity)
    out = out + identity
    if self.post_activation:
      out = act(name="act2")(out)
    return out


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5: stride on the 3x3), expansion 4, grouped/wide options."""

  planes: int
  stride: int = 1
  downsample: bool = False
  batch_norm: bool = True
  post_activation: bool = True
  activation: str = "relu"
  negative_slope: float = 0.01
  groups: int = 1
  base_width: int = 64
  expansion = 4

  @nn.compact
  def __call__(self, x):
    width = int(self.planes * (self.base_width / 64.0)) * self.groups
    bias = not self.batch_norm
    act = functools.partial(Activation, self.activation, self.negative_slope)
    out = _conv(width, 1, 1, "conv1", bias=bias)(x)
    if self.batch_norm:
      out = _bn("bn1")(out)
    out = act(name="act1")(out)
    out = _conv(width, 3, self.stride, "conv2", bias=bias, groups=self.groups)(out)
    if self.batch_norm:
      out = _bn("bn2")(out)
    out = act(name="act2")(out)
    out = _conv(self.planes * 4, 1, 1, "conv3", bias=bias)(out)
    if self.batch_norm:
      out = _bn("bn3")(out)
    identity = x
    if self.downsample:
      identity = _conv(self.planes * 4, 1, self.stride, "downsample_0", bias=bias)(x)
      if self.batch_norm:
        identity = _bn("downsample_1")(identity)
    out = out + identity
    if self.post_activation:
      out = act(name="act3")(out)
    return out


class PreActBlock(nn.Module):
  """Pre-activation basic block (He et al. 2016): ``y = S(h) + conv2(act(bn1(conv1(h))))``, ``h = act(bn0(x))``.

  ``S`` is the identity on ``x`` or a 1x1 projection of ``h`` (no BatchNorm on the projection). There is no
  activation after the addition by construction; ``post_activation`` is ignored.
  """

  planes: int
  stride: int = 1
  downsample: bool = False
  batch_norm: bool = True
  post_activation: bool = False
  activation: str = "relu"
  negative_slope: float = 0.01
  groups: int = 1
  base_width: int = 64
  expansion = 1

  @nn.compact
  def __call__(self, x):
    bias = not self.batch_norm
    act = functools.partial(Activation, self.activation, self.negative_slope)
    h = _bn("bn0")(x) if self.batch_norm else x
    h = act(name="act0")(h)
    out = _conv(self.planes, 3, self.stride, "conv1", bias=bias)(h)
    if self.batch_norm:
      out = _bn("bn1")(out)
    out = act(name="act1")(out)
    out = _conv(self.planes, 3, 1, "conv2", bias=bias)(out)
    identity = x
    if self.downsample:
      identity = _conv(self.planes, 1, self.stride, "downsample_0", bias=bias)(h)
    return out + identity


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """A torchvision-layout ResNet in Flax (NHWC). See the module docstring for conventions and variants.

  Attributes:
    stage_sizes: number of blocks per stage (``(2, 2, 2, 2)`` for resnet18).
    block: ``'basic'`` or ``'bottleneck'``.
    num_classes: width of ``fc``.
    groups, width_per_group: ResNeXt / wide ResNet options, as torchvision.
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  num_classes: int = 1000
  groups: int = 1
  width_per_group: int = 64
  batch_norm: bool = True
  post_activation: bool = True
  stem_pool: str = "max"
  activation: str = "relu"
  negative_slope: float = 0.01
  small_stem: bool = False
  preact: bool = False

  def validate(self):
    if self.block not in BLOCKS:
      raise ValueError(f"unknown block {self.block!r}; expected one of {sorted(BLOCKS)}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
    if self.stem_pool not in STEM_POOLS:
      raise ValueError(f"unknown stem_pool {self.stem_pool!r}; expected one of {STEM_POOLS}")
    if self.preact and self.block != "basic":
      raise ValueError("preact=True is implemented for basic blocks only")
    if self.small_stem and self.stem_pool != "none":
      raise ValueError("small_stem=True has no stem pooling: pass stem_pool='none'")

  @property
  def block_cls(self):
    return PreActBlock if self.preact else BLOCKS[self.block]

  def block_names(self) -> list[str]:
    """torchvision names of every residual block, in forward order."""
    return [f"layer{s + 1}.{b}" for s, n in enumerate(self.stage_sizes) for b in range(n)]

  def block_config(self, stage: int, index: int) -> dict[str, Any]:
    """Constructor arguments of block ``layer{stage+1}.{index}`` (inplanes included)."""
    cls = self.block_cls
    planes = 64 * 2**stage
    stride = 2 if (stage > 0 and index == 0) else 1
    if index == 0:
      inplanes = 64 if stage == 0 else 64 * 2 ** (stage - 1) * cls.expansion
    else:
      inplanes = planes * cls.expansion
    downsample = index == 0 and (stride != 1 or inplanes != planes * cls.expansion)
    return dict(
        planes=planes,
        stride=stride,
        downsample=downsample,
        batch_norm=self.batch_norm,
        post_activation=self.post_activation,
        activation=self.activation,
        negative_slope=self.negative_slope,
        groups=self.groups,
        base_width=self.width_per_group,
        inplanes=inplanes,
    )

  @nn.compact
  def __call__(self, x):
    """Logits of a batch ``x`` of shape ``(N, H, W, 3)``; every named feature is sown (see module docstring)."""
    self.validate()
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
    feats = {}
    sow = feats.__setitem__
    if self.small_stem:
      x = _conv(64, 3, 1, "conv1", bias=not self.batch_norm)(x)
    else:
      x = _conv(64, 7, 2, "conv1", bias=not self.batch_norm)(x)
    sow("conv1", x)
    if self.batch_norm:
      x = _bn("bn1")(x)
    sow("bn1", x)
    x = Activation(self.activation, self.negative_slope, name="relu")(x)
    sow("relu", x)
    if self.stem_pool == "max":
      x = stem_max_pool(x)
    elif self.stem_pool == "avg":
      x = nn.avg_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=True)
    sow("maxpool", x)
    for s, n in enumerate(self.stage_sizes):
      for b in range(n):
        cfg = self.block_config(s, b)
        cfg.pop("inplanes")
        x = self.block_cls(**cfg, name=f"layer{s + 1}_{b}")(x)
        sow(f"layer{s + 1}.{b}", x)
      sow(f"layer{s + 1}", x)
    if self.preact:
      if self.batch_norm:
        x = _bn("bn_final")(x)
      x = Activation(self.activation, self.negative_slope, name="act_final")(x)
    x = jnp.mean(x, axis=(1, 2))
    sow("avgpool", x)
    x = nn.Dense(self.num_classes, name="fc")(x)
    sow("fc", x)
    # One sow of the whole dict: sown names share the namespace of submodule names ("conv1").
    self.sow("intermediates", "features", feats)
    return x


def _factory(stage_sizes, block, **fixed):
  def make(**kwargs) -> ResNet:
    return ResNet(stage_sizes=tuple(stage_sizes), block=block, **fixed, **kwargs)

  return make


resnet18 = _factory((2, 2, 2, 2), "basic")
resnet34 = _factory((3, 4, 6, 3), "basic")
resnet50 = _factory((3, 4, 6, 3), "bottleneck")
resnet101 = _factory((3, 4, 23, 3), "bottleneck")
resnet152 = _factory((3, 8, 36, 3), "bottleneck")
wide_resnet50_2 = _factory((3, 4, 6, 3), "bottleneck", width_per_group=128)
resnext50_32x4d = _factory((3, 4, 6, 3), "bottleneck", groups=32, width_per_group=4)

ARCHS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "wide_resnet50_2": wide_resnet50_2,
    "resnext50_32x4d": resnext50_32x4d,
}

for _name, _fn in ARCHS.items():
  _fn.__name__ = _name
  _fn.__qualname__ = _name
  _fn.__doc__ = (
      f"torchvision's ``{_name}`` as a Flax module (NHWC). Keyword arguments: the variant options of "
      ":class:`ResNet` (``batch_norm``, ``post_activation``, ``stem_pool``, ``activation``, ``small_stem``, "
      "``preact``, ``num_classes``)."
  )


def paper_variant(**kwargs) -> dict[str, Any]:
  """Options of the paper's architecture: no BatchNorm, no post-add activation, no stem pool."""
  return dict(batch_norm=False, post_activation=False, stem_pool="none", **kwargs)


def get_model(arch: str, **kwargs) -> ResNet:
  """Builds ``arch`` (a key of :data:`ARCHS`) with variant options."""
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
  return ARCHS[arch](**kwargs)
