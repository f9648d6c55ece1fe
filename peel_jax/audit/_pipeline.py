"""The audit's run: every image attacked from every split point under every defence setting, saved per unit.

A unit is one defence setting, one split point and one batch of images; each finished unit is saved atomically in
``OUT/parts`` by :class:`peel_jax.runs.Run`, so a killed audit resumes where it stopped.
"""

from __future__ import annotations

import sys
import time
import zlib

import numpy as np

from peel_jax import runs
from peel_jax.audit import _attack
from peel_jax.audit._config import AuditConfig, parse_defence

OBS_TOL = 1e-3
"""An image reproduces the observation when its relative observation residual is at most this."""


def units(config: AuditConfig, n_images: int) -> list[tuple[str, str, int, int, int]]:
  """``[(unit_id, setting, layer_index, start, stop), ...]`` in run order: setting, then layer, then batch."""
  out = []
  for setting in config.defences:
    slug = setting.replace(":", "-")
    for li, layer in enumerate(config.layers):
      for b, (s, e) in enumerate(runs.batches(n_images, config.batch_size)):
        out.append((f"{slug}__{layer}__b{b}", setting, li, s, e))
  return out


class _Bar:
  """Progress over image x layer attacks: tqdm on a terminal, a line per unit otherwise."""

  def __init__(self, total: int, done: int):
    self.total, self.done = total, done
    self.tqdm = None
    if sys.stderr.isatty():
      from tqdm import tqdm

      self.tqdm = tqdm(total=total, initial=done, desc="audit (images x layers)", file=sys.stderr)

  def update(self, n: int, what: str) -> None:
    self.done += n
    if self.tqdm is not None:
      self.tqdm.set_postfix_str(what)
      self.tqdm.update(n)
    else:
      print(f"audit: {self.done}/{self.total} image x layer attacks done ({what})", file=sys.stderr, flush=True)

  def close(self) -> None:
    if self.tqdm is not None:
      self.tqdm.close()


def _nonnegative(model, layer: str) -> bool:
  """Whether ``layer``'s output is known to be >= 0 (it ends in a ReLU): the attacker then clips defended
  features at 0, as the defences study does."""
  if model.activation != "relu":
    return False
  return layer in ("relu", "maxpool") or (model.post_activation and not model.preact)


class _Batches:
  """Normalised images and their features per batch, sharded over the local devices, computed once."""

  def __init__(self, model, variables, pixels: np.ndarray):
    self.model, self.variables, self.pixels = model, variables, pixels
    self.mesh = runs.batch_mesh()
    self.cache = {}

  def get(self, start: int, stop: int):
    """``(x, feats, n)``: sharded normalised images (padded to the device count), their features, real count."""
    import peel_jax
    from peel_jax import images

    if (start, stop) not in self.cache:
      x, n = runs.shard_batch(images.normalize(self.pixels[start:stop]), self.mesh)
      self.cache[(start, stop)] = (x, peel_jax.features(self.model, self.variables, x), n)
    return self.cache[(start, stop)]


def _unit(model, variables, config: AuditConfig, uid: str, setting: str, layer: str, x, feats, n: int):
  """Attacks one unit; returns ``(per_image, x_hat uint8, utility)``."""
  import jax
  import jax.numpy as jnp

  from peel_jax import defences, images
  from peel_jax.blocks import forward_from

  key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(uid.encode()) % (2**31))
  kind, strength = parse_defence(setting)
  clean = feats[layer]
  observed = defences.apply_defence(kind, strength, clean, jax.random.fold_in(key, 1))
  if kind != "none" and _nonnegative(model, layer):
    observed = jnp.maximum(observed, 0.0)
  budget = _attack.Budget(config.max_iters, config.cg_iters, config.refine, config.certify)
  x_hat, per_image = _attack.attack(model, variables, observed, layer, key=key, image=x, true_features=feats,
                                    budget=budget)
  per_image = {k: v[:n] for k, v in per_image.items()}
  c, o = np.asarray(clean, np.float64)[:n].reshape(n, -1), np.asarray(observed, np.float64)[:n].reshape(n, -1)
  utility = {"feature_distortion": np.linalg.norm(o - c, axis=1) / np.maximum(np.linalg.norm(c, axis=1), 1e-30)}
  if kind == "none":
    utility["agrees_with_undefended"] = np.ones(n, bool)
  else:
    pred = lambda h: np.argmax(np.asarray(forward_from(model, variables, h, layer))[:n], -1)  # noqa: E731
    utility["agrees_with_undefended"] = pred(observed) == pred(clean)
  rec = np.round(images.denormalize(x_hat[:n]) * 255).astype(np.uint8)
  return per_image, rec, utility


def _rows(config, names, uid, setting, layer, start, per_image, utility) -> list[dict]:
  rows = []
  for i in range(len(per_image["psnr"])):
    rows.append({
        "image": names[start + i], "image_index": start + i, "layer": layer, "defence": setting, "method": "peel",
        **{k: per_image[k][i] for k in ("psnr", "ssim", "mse", "observation_residual")},
        "reproduces_observation": bool(per_image["observation_residual"][i] <= OBS_TOL),
        **{k: per_image[k][i] for k in ("blockwise_psnr", "refine_start", "blocks_converged", "certificate",
                                        "certificate_detail", "seconds")},
        **{k: utility[k][i] for k in ("feature_distortion", "agrees_with_undefended")},
        "unit": uid,
    })
  return rows


def run_units(config: AuditConfig, run: runs.Run, model, variables, names, pixels: np.ndarray) -> list[dict]:
  """Computes every unit not yet done (this process's share), saving each; returns every unit's rows."""
  todo_all = units(config, len(names))
  ids = [u[0] for u in todo_all]
  mine = set(run.mine(ids))
  batches = _Batches(model, variables, pixels)
  total = len(config.defences) * len(config.layers) * len(names)
  bar = _Bar(total, sum(e - s for uid, _, _, s, e in todo_all if run.done(uid)))
  try:
    for uid, setting, li, start, stop in todo_all:
      if uid not in mine:
        continue
      layer = config.layers[li]
      x, feats, n = batches.get(start, stop)
      t0 = time.perf_counter()
      per_image, rec, utility = _unit(model, variables, config, uid, setting, layer, x, feats, n)
      rows = _rows(config, names, uid, setting, layer, start, per_image, utility)
      run.save(uid, rows, arrays={"reconstruction": rec}, extra={"seconds": time.perf_counter() - t0})
      bar.update(stop - start, f"{setting}, {layer}")
  finally:
    bar.close()
  return run.collect(ids)


def reconstructions(config: AuditConfig, run: runs.Run, n_images: int) -> dict:
  """``{(setting, layer): (N, S, S, 3) uint8}`` from the saved parts."""
  out = {}
  for uid, setting, li, start, stop in units(config, n_images):
    out.setdefault((setting, config.layers[li]), []).append(run.arrays(uid)["reconstruction"])
  return {k: np.concatenate(v) for k, v in out.items()}


def unit_seconds(config: AuditConfig, run: runs.Run, n_images: int) -> dict:
  """``{(setting, layer): wall seconds}`` summed over the layer's units (as measured when each was computed)."""
  out = {}
  for uid, setting, li, _, _ in units(config, n_images):
    k = (setting, config.layers[li])
    out[k] = out.get(k, 0.0) + float(run.load(uid)["extra"].get("seconds", 0.0))
  return out
