"""torchvision ``state_dict`` <-> Flax variables, strict and exact.

The key map is explicit and mechanical (after n2cholas/jax-resnet): a Flax leaf at module path
``(layer2_0, downsample_0, kernel)`` is torch key ``layer2.0.downsample.0.weight``; ``_<digit>`` suffixes of module
names become ``.<digit>``. Leaves translate as

=================================  ==========================  ====================================
Flax (collection, leaf)            torch                       transform
=================================  ==========================  ====================================
params ``kernel`` (4-d, HWIO)      ``weight`` (OIHW)           transpose (2, 3, 1, 0)
params ``kernel`` (2-d, in x out)  ``weight`` (out x in)       transpose
params ``bias``                    ``bias``                    none
params ``scale`` (BatchNorm)       ``weight``                  none
params ``weight`` (PReLU)          ``weight``                  none
batch_stats ``mean`` / ``var``     ``running_mean`` / ``_var``  none
=================================  ==========================  ====================================

``num_batches_tracked`` is ignored. Anything else is an error naming the keys.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from peel_jax.models import resnet as _resnet


class PortError(ValueError):
  """A state_dict that does not fit the architecture."""


def _module_to_torch(part: str) -> str:
  return re.sub(r"_(\d+)$", r".\1", part) if re.match(r"^(layer\d+_\d+|downsample_\d+)$", part) else part


def _leaf_to_torch(collection: str, path: tuple[str, ...], ndim: int) -> str:
  leaf = path[-1]
  if collection == "batch_stats":
    name = {"mean": "running_mean", "var": "running_var"}[leaf]
  elif leaf in ("kernel", "scale"):
    name = "weight"
  else:
    name = leaf  # bias, prelu weight
  return ".".join([_module_to_torch(p) for p in path[:-1]] + [name])


def _to_torch_layout(collection: str, leaf: str, a: np.ndarray) -> np.ndarray:
  if collection == "params" and leaf == "kernel":
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
  return a


def _from_torch_layout(collection: str, leaf: str, a: np.ndarray, ndim: int) -> np.ndarray:
  if collection == "params" and leaf == "kernel":
    if a.ndim != ndim:
      return a  # reported as a shape mismatch by the caller
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
  return a


def _template(model: _resnet.ResNet, size: int = 64) -> dict:
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
  return {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}


def expected_keys(arch: str | _resnet.ResNet) -> dict[str, tuple[int, ...]]:
  """torch key -> torch shape that ``arch`` (a name or a :class:`ResNet`) expects."""
  model = _resnet.get_model(arch) if isinstance(arch, str) else arch
  out = {}
  for col, tree in _template(model).items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      shape = leaf.shape
      if col == "params" and path[-1] == "kernel":
        shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
      out[_leaf_to_torch(col, path, len(leaf.shape))] = tuple(shape)
  return out


@functools.lru_cache(maxsize=None)
def _expected_keys_cached(arch: str) -> dict[str, tuple[int, ...]]:
  return expected_keys(arch)


def load_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Reads a torchvision state_dict into numpy arrays.

  Args:
    source: a path to a ``.pth``/``.pt`` file (needs torch), a ``.safetensors`` file, or a mapping of numpy arrays
      or torch tensors. A checkpoint dict holding the weights under ``'state_dict'`` or ``'model'`` is unwrapped.
  """
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.exists(path):
      raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
      from safetensors.numpy import load_file

      source = load_file(path)
    else:
      try:
        import torch
      except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {path!r} needs PyTorch (a .pth/.pt file is a torch pickle). Install the torch extra "
            "(pip install 'peel_jax[torch]'), or convert the weights to .safetensors."
        ) from e
      try:
        source = torch.load(path, map_location="cpu", weights_only=True)
      except Exception as e:
        raise PortError(f"cannot read {path!r} as a torch state_dict: {e}") from e
  if not isinstance(source, Mapping):
    raise PortError(f"a state_dict must be a mapping of name -> array, got {type(source).__name__}")
  for wrapper in ("state_dict", "model"):
    if wrapper in source and isinstance(source[wrapper], Mapping):
      source = source[wrapper]
  out = {}
  for k, v in source.items():
    if hasattr(v, "detach"):
      v = v.detach().cpu().numpy()
    out[str(k)] = np.asarray(v)
  return out


def _guess_arch(entries: set[tuple[str, tuple[int, ...]]]) -> str | None:
  """The architecture whose (key, shape) pairs best match ``entries`` (keys alone cannot tell resnet50 from
  wide_resnet50_2 or resnext50_32x4d)."""
  best, best_score = None, 0.0
  for name in _resnet.ARCHS:
    exp = set(_expected_keys_cached(name).items())
    score = len(entries & exp) / max(len(entries | exp), 1)
    if score > best_score:
      best, best_score = name, score
  return best if best_score > 0.9 else None


def from_torchvision(source, arch: str | _resnet.ResNet = "resnet18", **variant) -> dict:
  """Converts a torchvision state_dict to Flax variables for ``arch``.

  Args:
    source: see :func:`load_state_dict`.
    arch: an architecture name (``'resnet18'`` ...) built with ``variant`` options, or a :class:`ResNet` instance.
    **variant: variant options when ``arch`` is a name (e.g. ``num_classes=10``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` only with BatchNorm), float32 ``jax.Array`` leaves.

  Raises:
    PortError: naming every missing key, unexpected key and mis-shaped key (expected vs found torch shape), and the
      architecture the file looks like when it is another one.
  """
  model = _resnet.get_model(arch, **variant) if isinstance(arch, str) else arch
  arch_name = arch if isinstance(arch, str) else "the given model"
  sd = {k: v for k, v in load_state_dict(source).items() if not k.endswith("num_batches_tracked")}
  template = _template(model)
  expected = expected_keys(model)
  missing = sorted(set(expected) - set(sd))
  unexpected = sorted(set(sd) - set(expected))
  mismatched = [
      f"{k}: expected {expected[k]}, found {tuple(sd[k].shape)}"
      for k in sorted(set(expected) & set(sd))
      if tuple(sd[k].shape) != expected[k]
  ]
  if missing or unexpected or mismatched:
    msg = f"state_dict does not fit arch {arch_name!r}"
    guess = _guess_arch({(k, tuple(v.shape)) for k, v in sd.items()}) if isinstance(arch, str) else None
    if guess and guess != arch:
      msg += f" (it looks like a {guess!r} state_dict)"
    if missing:
      msg += f"; missing keys ({len(missing)}): {_short(missing)}"
    if unexpected:
      msg += f"; unexpected keys ({len(unexpected)}): {_short(unexpected)}"
    if mismatched:
      msg += f"; shape mismatches ({len(mismatched)}): {_short(mismatched)}"
    raise PortError(msg)
  variables = {}
  for col, tree in template.items():
    flat = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
      key = _leaf_to_torch(col, path, len(leaf.shape))
      a = _from_torch_layout(col, path[-1], sd[key], len(leaf.shape))
      if not np.all(np.isfinite(a)):
        raise PortError(f"non-finite values in {key!r}")
      flat[path] = jnp.asarray(a, jnp.float32)
    variables[col] = traverse_util.unflatten_dict(flat)
  return variables


def to_torchvision(variables: Mapping, arch: str | _resnet.ResNet = "resnet18", **variant) -> dict[str, np.ndarray]:
  """Flax variables -> a torchvision state_dict of numpy arrays (``num_batches_tracked`` omitted).

  The round trip ``from_torchvision(to_torchvision(v, arch), arch)`` is exact.
  """
  model = _resnet.get_model(arch, **variant) if isinstance(arch, str) else arch
  expected = expected_keys(model)
  out = {}
  for col in ("params", "batch_stats"):
    if col not in variables:
      continue
    for path, leaf in traverse_util.flatten_dict(dict(variables[col])).items():
      key = _leaf_to_torch(col, path, np.ndim(leaf))
      if key not in expected:
        raise PortError(f"variable {col}/{'/'.join(path)} has no torchvision key in arch {arch!r}")
      out[key] = np.array(_to_torch_layout(col, path[-1], np.asarray(leaf)), order="C", copy=True)
  missing = sorted(set(expected) - set(out))
  if missing:
    raise PortError(f"variables lack {len(missing)} entries of arch {arch!r}: {_short(missing)}")
  return out


def _short(items, n: int = 8) -> str:
  items = list(items)
  more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
  return ", ".join(items[:n]) + more
