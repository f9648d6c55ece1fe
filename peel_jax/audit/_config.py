"""The audit's configuration: what was asked, and digests of what was read (a rerun resumes only when all match)."""

from __future__ import annotations

import dataclasses

from peel_jax.runs import BadConfig

DEFAULT_LAYERS = ("maxpool", "layer1", "layer2", "layer3", "layer4")
DEFENCE_KINDS = ("gaussian", "quantize", "dropout")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
  """One audit. ``defences`` always starts with ``'none'`` (the undefended features, the reference every defence's
  leakage and utility cost is read against); ``weights_sha256`` and ``images_sha256`` pin what was read."""

  arch: str = "resnet18"
  variant: str = "torchvision"
  weights: str | None = None
  weights_sha256: str | None = None
  seed: int = 0
  images: str = "bundled:faces"
  images_sha256: str = ""
  size: int = 128
  limit: int = 8
  layers: tuple[str, ...] = DEFAULT_LAYERS
  defences: tuple[str, ...] = ("none",)
  max_iters: int = 30
  cg_iters: int = 20
  refine: int = 40
  certify: bool = True
  batch_size: int = 8


def parse_defence(spec: str) -> tuple[str, float]:
  """``'gaussian:0.1'`` -> ``('gaussian', 0.1)``; ``'none'`` -> ``('none', 0.0)``.

  Raises:
    BadConfig: an unknown kind, a missing or non-numeric strength, or a strength outside the defence's range
      (checked by :func:`peel_jax.defences.apply_defence` itself).
  """
  spec = spec.strip()
  if spec == "none":
    return "none", 0.0
  kind, sep, value = spec.partition(":")
  if kind not in DEFENCE_KINDS:
    raise BadConfig(f"unknown defence {spec!r}; expected none or KIND:STRENGTH with KIND one of "
                    f"{', '.join(DEFENCE_KINDS)} (e.g. gaussian:0.1, quantize:4, dropout:0.5)")
  try:
    strength = float(value)
  except ValueError:
    raise BadConfig(f"defence {spec!r} needs a number after the colon (e.g. {kind}:0.5)") from None
  import jax
  import jax.numpy as jnp

  from peel_jax import defences

  try:
    defences.apply_defence(kind, strength, jnp.ones((1, 2, 2, 2), jnp.float32), jax.random.key(0))
  except ValueError as e:
    raise BadConfig(f"defence {spec!r}: {e}") from None
  return kind, strength


def defence_id(kind: str, strength: float) -> str:
  """The canonical name of a setting: ``'none'``, ``'gaussian:0.1'``, ``'quantize:4'``."""
  return "none" if kind == "none" else f"{kind}:{strength:g}"


def defence_label(setting: str) -> str:
  """A setting in words, for the report."""
  if setting == "none":
    return "undefended features"
  kind, _, s = setting.partition(":")
  return {"gaussian": f"Gaussian noise, noise-to-signal ratio {s}", "quantize": f"quantised to {s} bits",
          "dropout": f"channel dropout, p = {s}"}[kind] + " (peel_jax.defences)"


def check(config: AuditConfig, valid_layers: list[str]) -> None:
  """Raises :class:`BadConfig` on the first option that cannot work, naming it."""
  if config.size < 32 or config.size % 32:
    raise BadConfig(f"--size must be a positive multiple of 32, got {config.size}")
  for name in ("limit", "batch_size"):
    if getattr(config, name) < 1:
      raise BadConfig(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
  for name in ("max_iters", "cg_iters"):
    if getattr(config, name) < 1:
      raise BadConfig(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
  if config.refine < 0:
    raise BadConfig(f"--refine must be >= 0, got {config.refine}")
  if not config.layers:
    raise BadConfig("--layers is empty")
  bad = [l for l in config.layers if l not in valid_layers]
  if bad:
    raise BadConfig(f"unknown layer(s) {', '.join(bad)} for {config.arch}; valid layers: {', '.join(valid_layers)}")
  if len(set(config.layers)) != len(config.layers):
    raise BadConfig(f"--layers names a layer twice: {','.join(config.layers)}")
