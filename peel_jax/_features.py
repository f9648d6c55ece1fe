"""Named intermediate outputs of a ResNet, keyed by torchvision module names."""

from __future__ import annotations

from typing import Iterable

import jax

from peel_jax.models.resnet import ResNet


def feature_names(model: ResNet) -> list[str]:
  """Every feature name of ``model`` in forward order (torchvision module names)."""
  names = ["conv1", "bn1", "relu", "maxpool"]
  for s, n in enumerate(model.stage_sizes):
    names += [f"layer{s + 1}.{b}" for b in range(n)] + [f"layer{s + 1}"]
  return names + ["avgpool", "fc"]


def features(model: ResNet, variables, x: jax.Array, names: Iterable[str] | str | None = None) -> dict:
  """Intermediate outputs of ``model`` on ``x``.

  Args:
    model: a :class:`peel_jax.models.ResNet`.
    variables: its Flax variables (``params``, ``batch_stats``).
    x: images, ``(N, H, W, 3)`` float32, normalised.
    names: torchvision module names (``'layer2.1'``, ``'layer3'``, ``'fc'`` ...), one name, or ``None`` for all.

  Returns:
    ``{name: array}``; spatial features are NHWC, ``avgpool`` is ``(N, C)``, ``fc`` the logits.

  Raises:
    KeyError: an unknown name, with the list of valid ones.
  """
  valid = feature_names(model)
  if isinstance(names, str):
    names = [names]
  wanted = valid if names is None else list(names)
  unknown = [n for n in wanted if n not in valid]
  if unknown:
    raise KeyError(f"unknown feature name(s) {unknown}; valid names: {', '.join(valid)}")
  _, state = model.apply(variables, x, mutable=["intermediates"])
  inter = state["intermediates"]["features"][0]
  return {n: inter[n] for n in wanted}
