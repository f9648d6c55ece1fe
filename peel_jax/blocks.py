"""The inference-mode view of a ResNet that the inverter consumes: folded blocks, stacked stages, the stem.

Every BatchNorm is folded into the convolution before it, so each convolution is an affine map
``A(x) = conv(x, W) + b`` with

    W' = W * s,   b' = (b - mean) * s + beta,   s = gamma / sqrt(var + eps)      (per output channel).

A :class:`Block` is a pytree of arrays (``params``) with a static :class:`BlockSpec`; ``block(x)`` is its pure forward
function on NHWC batches. Forward of each kind (``act`` is the network's activation, ``S`` the identity or a strided
1x1 affine shortcut):

=============  ==========================================================================
``basic``      ``z = S(x) + A2(act(A1 x))``;  ``y = act(z)`` if ``post_activation`` else ``z``
``bottleneck`` ``z = S(x) + A3(act(A2(act(A1 x))))``;  ``y = act(z)`` if ``post_activation``
``preact``     ``h = act(P x)`` (``P``: per-channel affine, the folded BN0); ``z = S(h) + A2(act(A1 h))``,
               with ``S(h) = x`` for the identity shortcut; ``y = z``
``stem``       ``y = pool(act(A0 x))``, pool in {max 3x3/2 pad 1, avg 3x3/2 pad 1, none}
=============  ==========================================================================

``spec.input_nonneg`` records what the architecture guarantees: the block's input is a ReLU output (every inner
torchvision block, the first block after the stem). :class:`Stage` holds a stage's first block (it changes shape)
and the remaining identical blocks stacked along a leading axis for ``jax.lax.scan``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from peel_jax.models.resnet import BN_EPS, ResNet, activation_fn

KINDS = ("basic", "bottleneck", "preact", "stem")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """Static description of a folded block (hashable; safe as a ``jit`` static argument).

  Attributes:
    kind: one of :data:`KINDS`.
    name: torchvision name (``'layer2.0'``) or ``'stem'``.
    kernels, strides, groups: per branch convolution, in forward order.
    shortcut: ``'identity'``, ``'conv'`` (strided 1x1 affine) or ``'none'`` (stem).
    stride: the block's total spatial stride (the stem's includes its pool).
    activation, negative_slope: the network's activation.
    post_activation: whether ``act`` follows the residual addition.
    input_nonneg: the block's input is known to be ``>= 0`` (it is a ReLU output).
    pool: the stem's pooling (``'max'``, ``'avg'``, ``'none'``); ``'none'`` for residual blocks.
    in_channels, out_channels: channel counts of input and output.
  """

  kind: str
  # Not part of equality/hash: identical blocks with different names share one compiled solver.
  name: str = dataclasses.field(compare=False)
  kernels: tuple[int, ...]
  strides: tuple[int, ...]
  groups: tuple[int, ...]
  shortcut: str
  stride: int
  activation: str = "relu"
  negative_slope: float = 0.01
  post_activation: bool = True
  input_nonneg: bool = False
  pool: str = "none"
  in_channels: int = 0
  out_channels: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown block kind {self.kind!r}; expected one of {KINDS}")

  @property
  def activation_sites(self) -> tuple[str, ...]:
    """Names of the activation sites, in forward order (keys of ``params['slopes']`` for prelu)."""
    if self.kind == "stem":
      return ("relu",)
    if self.kind == "preact":
      return ("act0", "act1")
    inner = tuple(f"act{i + 1}" for i in range(len(self.kernels) - 1))
    return inner + ((f"act{len(self.kernels)}",) if self.post_activation else ())


def conv_affine(x: jax.Array, p: Mapping[str, jax.Array], stride: int = 1, groups: int = 1) -> jax.Array:
  """``conv(x, kernel) + bias`` with torchvision's symmetric padding ``k // 2``.

  Args:
    x: ``(N, H, W, Cin)``.
    p: ``{'kernel': (k, k, Cin / groups, Cout), 'bias': (Cout,)}``.
  """
  k = p["kernel"].shape[0]
  pad = k // 2
  y = lax.conv_general_dilated(
      x,
      p["kernel"].astype(x.dtype),
      window_strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups,
  )
  return y + _channels(p["bias"].astype(x.dtype), y.ndim)


def _channels(v: jax.Array, ndim: int) -> jax.Array:
  """A per-channel vector reshaped to broadcast against a channels-last array of rank ``ndim``."""
  return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


def pool(x: jax.Array, kind: str) -> jax.Array:
  """The stem's 3x3 stride-2 pooling with padding 1 (max pads with -inf; avg counts the padding, as torch)."""
  if kind == "none":
    return x
  window, strides, pads = (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  if kind == "max":
    return lax.reduce_window(x, -jnp.inf, lax.max, window, strides, pads)
  if kind == "avg":
    return lax.reduce_window(x, 0.0, lax.add, window, strides, pads) / 9.0
  raise ValueError(f"unknown pool {kind!r}")


@flax.struct.dataclass
class Block:
  """A folded residual block (or the stem): arrays in ``params``, static ``spec``.

  ``params`` holds ``convs`` (a tuple of ``{'kernel', 'bias'}``, HWIO kernels), ``shortcut`` (``{'kernel',
  'bias'}`` for a 1x1 affine shortcut), ``pre`` (``{'scale', 'bias'}``, the preact block's folded BN0) and
  ``slopes`` (``{site: slope}`` for prelu).
  """

  params: dict
  spec: BlockSpec = flax.struct.field(pytree_node=False)

  # --- pieces -----------------------------------------------------------------------------------------------------
  def act(self, site: str):
    """The activation function at ``site`` (see :attr:`BlockSpec.activation_sites`)."""
    slope = self.params.get("slopes", {}).get(site) if self.spec.activation == "prelu" else None
    return activation_fn(self.spec.activation, self.spec.negative_slope, slope)

  def affine(self, i: int, x: jax.Array) -> jax.Array:
    """The ``i``-th branch convolution (``A_{i+1}``) applied to ``x``."""
    return conv_affine(x, self.params["convs"][i], self.spec.strides[i], self.spec.groups[i])

  def shortcut(self, x: jax.Array) -> jax.Array:
    """``S(x)``: identity or the strided 1x1 affine shortcut (for preact pass ``h``)."""
    if self.spec.shortcut == "conv":
      return conv_affine(x, self.params["shortcut"], self.spec.stride)
    return x

  def pre(self, x: jax.Array) -> jax.Array:
    """Preact block only: ``h = act0(P x)``."""
    p = self.params["pre"]
    scale, bias = (_channels(p[k].astype(x.dtype), x.ndim) for k in ("scale", "bias"))
    return self.act("act0")(x * scale + bias)

  def branch(self, h: jax.Array) -> jax.Array:
    """The residual branch ``F``: affine maps with activations between them (none after the last)."""
    sites = ("act1",) if self.spec.kind == "preact" else tuple(f"act{i + 1}" for i in range(len(self.spec.kernels)))
    out = h
    for i in range(len(self.spec.kernels)):
      out = self.affine(i, out)
      if i < len(self.spec.kernels) - 1:
        out = self.act(sites[i])(out)
    return out

  def pre_activation(self, x: jax.Array) -> jax.Array:
    """``z``, the block's output before its post-add activation (the output itself when there is none)."""
    kind = self.spec.kind
    if kind == "stem":
      raise ValueError("the stem has no residual addition")
    if kind == "preact":
      h = self.pre(x)
      skip = self.shortcut(h) if self.spec.shortcut == "conv" else x
      return skip + self.branch(h)
    return self.shortcut(x) + self.branch(x)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Forward on a batch ``x`` of shape ``(N, H, W, in_channels)``."""
    if self.spec.kind == "stem":
      return pool(self.act("relu")(self.affine(0, x)), self.spec.pool)
    z = self.pre_activation(x)
    if self.spec.post_activation:
      z = self.act(f"act{len(self.spec.kernels)}")(z)
    return z

  def apply(self, x: jax.Array) -> jax.Array:
    """Same as ``block(x)``."""
    return self(x)

  def input_shape(self, output_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The input shape ``(..., H * stride, W * stride, in_channels)`` for an output shape (even input sizes)."""
    *lead, h, w, _ = output_shape
    return (*lead, h * self.spec.stride, w * self.spec.stride, self.spec.in_channels)

  def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape for an input shape (by abstract evaluation, cached by ``jit`` per spec and shapes)."""
    return _forward.eval_shape(self, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)).shape

  def with_params(self, params: dict) -> "Block":
    return Block(params=params, spec=self.spec)


_forward = jax.jit(lambda block, x: block(x))


@flax.struct.dataclass
class Stage:
  """A stage: its first block (may change shape) and the rest, identical, stacked along axis 0 of every leaf."""

  first: Block
  rest: Block | None
  name: str = flax.struct.field(pytree_node=False, default="")

  @property
  def depth(self) -> int:
    return 1 + (0 if self.rest is None else int(jax.tree.leaves(self.rest.params)[0].shape[0]))

  def blocks(self) -> list[Block]:
    """The stage's blocks, unstacked, in forward order."""
    out = [self.first]
    if self.rest is not None:
      for i in range(self.depth - 1):
        out.append(self.rest.with_params(jax.tree.map(lambda a, i=i: a[i], self.rest.params)))
    return out

  def __call__(self, x: jax.Array) -> jax.Array:
    """Forward: the first block, then a ``lax.scan`` over the stacked rest."""
    x = self.first(x)
    if self.rest is None:
      return x
    spec = self.rest.spec

    def step(h, p):
      return Block(params=p, spec=spec)(h), None

    x, _ = lax.scan(step, x, self.rest.params)
    return x


# --- extraction ----------------------------------------------------------------------------------------------------


def fold_batchnorm(conv: Mapping, bn: Mapping | None, stats: Mapping | None, eps: float = BN_EPS) -> dict:
  """Folds an inference-mode BatchNorm into the convolution before it.

  Args:
    conv: Flax conv params ``{'kernel': HWIO, 'bias'?: (Cout,)}``.
    bn: BatchNorm params ``{'scale', 'bias'}`` or ``None`` (no BatchNorm).
    stats: BatchNorm statistics ``{'mean', 'var'}``.

  Returns:
    ``{'kernel', 'bias'}`` of the affine map ``conv`` followed by the BatchNorm.
  """
  kernel = jnp.asarray(conv["kernel"], jnp.float32)
  bias = jnp.asarray(conv.get("bias", jnp.zeros(kernel.shape[-1])), jnp.float32)
  if bn is None:
    return {"kernel": kernel, "bias": bias}
  s = bn["scale"] / jnp.sqrt(stats["var"] + eps)
  return {"kernel": kernel * _channels(s, kernel.ndim), "bias": (bias - stats["mean"]) * s + bn["bias"]}


def _sub(variables, name):
  params = variables["params"].get(name, {}) if name else variables["params"]
  stats = variables.get("batch_stats", {}).get(name, {}) if name else variables.get("batch_stats", {})
  return params, stats


def _folded(params, stats, conv_name, bn_name):
  if conv_name not in params:
    raise KeyError(f"variables lack convolution {conv_name!r}")
  bn = params.get(bn_name) if bn_name else None
  return fold_batchnorm(params[conv_name], bn, stats.get(bn_name) if bn is not None else None)


def _slopes(params, sites):
  return {s: jnp.asarray(params[s]["weight"], jnp.float32) for s in sites if s in params and "weight" in params[s]}


def stem_block(model: ResNet, variables) -> Block:
  """The folded stem ``pool(act(A0 x))`` of ``model``."""
  params, stats = _sub(variables, None)
  conv = _folded(params, stats, "conv1", "bn1" if model.batch_norm else None)
  k = conv["kernel"].shape[0]
  conv_stride = 1 if model.small_stem else 2
  pool_kind = "none" if model.small_stem else model.stem_pool
  spec = BlockSpec(
      kind="stem",
      name="stem",
      kernels=(k,),
      strides=(conv_stride,),
      groups=(1,),
      shortcut="none",
      stride=conv_stride * (1 if pool_kind == "none" else 2),
      activation=model.activation,
      negative_slope=model.negative_slope,
      post_activation=False,
      input_nonneg=False,
      pool=pool_kind,
      in_channels=3,
      out_channels=64,
  )
  p = {"convs": (conv,)}
  if model.activation == "prelu":
    p["slopes"] = _slopes(params, ("relu",))
  return Block(params=p, spec=spec)


def residual_block(model: ResNet, variables, stage: int, index: int) -> Block:
  """The folded block ``layer{stage+1}.{index}`` of ``model``."""
  name = f"layer{stage + 1}.{index}"
  if not 0 <= stage < len(model.stage_sizes) or not 0 <= index < model.stage_sizes[stage]:
    raise KeyError(f"{model.__class__.__name__} has no block {name!r}")
  cfg = model.block_config(stage, index)
  params, stats = _sub(variables, f"layer{stage + 1}_{index}")
  bn = model.batch_norm
  kind = "preact" if model.preact else model.block
  if kind == "bottleneck":
    convs = tuple(_folded(params, stats, f"conv{i}", f"bn{i}" if bn else None) for i in (1, 2, 3))
    kernels, strides, groups = (1, 3, 1), (1, cfg["stride"], 1), (1, model.groups, 1)
  elif kind == "basic":
    convs = tuple(_folded(params, stats, f"conv{i}", f"bn{i}" if bn else None) for i in (1, 2))
    kernels, strides, groups = (3, 3), (cfg["stride"], 1), (1, 1)
  else:  # preact: conv1 + bn1 folded; conv2 has no BatchNorm after it
    convs = (_folded(params, stats, "conv1", "bn1" if bn else None), _folded(params, stats, "conv2", None))
    kernels, strides, groups = (3, 3), (cfg["stride"], 1), (1, 1)
  p: dict[str, Any] = {"convs": convs}
  if cfg["downsample"]:
    p["shortcut"] = _folded(params, stats, "downsample_0", "downsample_1" if (bn and kind != "preact") else None)
  if kind == "preact":
    c = cfg["inplanes"]
    if bn:
      s = params["bn0"]["scale"] / jnp.sqrt(stats["bn0"]["var"] + BN_EPS)
      p["pre"] = {"scale": s, "bias": params["bn0"]["bias"] - stats["bn0"]["mean"] * s}
    else:
      p["pre"] = {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}
  first_of_network = stage == 0 and index == 0
  input_nonneg = model.activation == "relu" and (
      first_of_network or (model.post_activation and not model.preact)
  )
  spec = BlockSpec(
      kind=kind,
      name=name,
      kernels=kernels,
      strides=strides,
      groups=groups,
      shortcut="conv" if cfg["downsample"] else "identity",
      stride=cfg["stride"],
      activation=model.activation,
      negative_slope=model.negative_slope,
      post_activation=model.post_activation and kind != "preact",
      input_nonneg=input_nonneg,
      in_channels=cfg["inplanes"],
      out_channels=cfg["planes"] * (4 if kind == "bottleneck" else 1),
  )
  if model.activation == "prelu":
    p["slopes"] = _slopes(params, ("act0", "act1", "act2", "act3"))
  return Block(params=p, spec=spec)


def stage_blocks(model: ResNet, variables, stage: int) -> Stage:
  """Stage ``stage`` (0-based): its first block and the rest stacked along a leading axis for ``lax.scan``."""
  n = model.stage_sizes[stage]
  first = residual_block(model, variables, stage, 0)
  rest = [residual_block(model, variables, stage, i) for i in range(1, n)]
  stacked = None
  if rest:
    specs = {dataclasses.replace(b.spec, name="") for b in rest}
    if len(specs) != 1:  # pragma: no cover - torchvision stages are uniform after the first block
      raise ValueError(f"blocks of layer{stage + 1} after the first are not identical: {specs}")
    spec = dataclasses.replace(rest[0].spec, name=f"layer{stage + 1}.1:{n}")
    stacked = Block(params=jax.tree.map(lambda *a: jnp.stack(a), *[b.params for b in rest]), spec=spec)
  return Stage(first=first, rest=stacked, name=f"layer{stage + 1}")


def extract(model: ResNet, variables, name: str) -> Block | Stage:
  """The named piece of ``model`` in folded inference form.

  Args:
    model: a :class:`peel_jax.models.ResNet`.
    variables: its Flax variables.
    name: ``'stem'``, a block (``'layer2.0'``) or a stage (``'layer2'``, returned as a :class:`Stage`).

  Raises:
    KeyError: an unknown name, listing the valid ones.
  """
  valid = ["stem"] + [f"layer{s + 1}" for s in range(len(model.stage_sizes))] + model.block_names()
  if name == "stem":
    return stem_block(model, variables)
  if name not in valid:
    raise KeyError(f"unknown block {name!r}; valid names: {', '.join(valid)}")
  head, _, tail = name.partition(".")
  stage = int(head[len("layer"):]) - 1
  if tail:
    return residual_block(model, variables, stage, int(tail))
  return stage_blocks(model, variables, stage)


def network_blocks(model: ResNet, variables) -> list[Block]:
  """The stem and every residual block, in forward order."""
  out = [stem_block(model, variables)]
  for s, n in enumerate(model.stage_sizes):
    out += [residual_block(model, variables, s, b) for b in range(n)]
  return out


def forward_from(model: ResNet, variables, h: jax.Array, layer: str) -> jax.Array:
  """The logits of ``model`` given the output ``h`` of ``layer``: the rest of the forward pass, in folded form.

  What a split-learning server computes from the features a client shares (and what a defence applied to those
  features must preserve).

  Args:
    model: a :class:`peel_jax.models.ResNet`.
    variables: its Flax variables.
    h: the output of ``layer``, ``(N, H, W, C)``.
    layer: ``'maxpool'`` (the stem output), ``'layerK'`` or ``'layerK.J'``.

  Returns:
    Logits ``(N, num_classes)``; equal to ``model.apply(variables, x)`` when ``h`` is ``layer``'s output on ``x``.

  Raises:
    KeyError: an unknown ``layer``, listing the valid ones.
  """
  valid = ["maxpool"] + [f"layer{s + 1}" for s in range(len(model.stage_sizes))] + model.block_names()
  if layer not in valid:
    raise KeyError(f"cannot continue the forward pass from {layer!r}; valid layers: {', '.join(valid)}")
  names = model.block_names()
  if layer == "maxpool":
    start = 0
  elif "." in layer:
    start = names.index(layer) + 1
  else:
    stage = int(layer[len("layer"):])
    start = sum(model.stage_sizes[:stage])
  x = h
  for name in names[start:]:
    s, b = name[len("layer"):].split(".")
    x = residual_block(model, variables, int(s) - 1, int(b))(x)
  params, stats = _sub(variables, None)
  if model.preact:
    if model.batch_norm:
      f = fold_batchnorm({"kernel": jnp.ones((1, 1, 1, x.shape[-1])), "bias": jnp.zeros((x.shape[-1],))},
                         params["bn_final"], stats["bn_final"])
      x = x * _channels(f["kernel"][0, 0, 0], x.ndim) + _channels(f["bias"], x.ndim)
    slope = params.get("act_final", {}).get("weight") if model.activation == "prelu" else None
    x = activation_fn(model.activation, model.negative_slope, slope)(x)
  x = jnp.mean(x, axis=(1, 2))
  return x @ params["fc"]["kernel"] + params["fc"]["bias"][None]
