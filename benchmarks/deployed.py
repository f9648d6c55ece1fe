"""Deployed-network table: what each attack recovers from each split point of the ResNets people deploy.

    python -m benchmarks.deployed --out benchmarks/results/deployed \
        --networks resnet18_bn,paper_0.3 --layers maxpool,layer1,layer2 --images grace_hopper,lfw:0

Networks (``--networks``; random inits are seeded by ``--seed``):

* ``resnet18``, ``resnet50``: torchvision architectures at Flax's random init (BatchNorm statistics 0 and 1).
* ``resnet18_bn``, ``resnet50_bn``: the same with random BatchNorm statistics and affine parameters
  (:func:`random_batch_stats`), as a trained network has non-trivial ones.
* ``resnet18_trained``: resnet18 trained here, offline, on the bundled digits (:func:`trained_resnet18`); trained
  once into ``OUT/networks/``, its hold-out accuracy beside it.
* ``paper_0.3``, ``paper_he``: the paper variant (no BatchNorm, no post-add ReLU, no stem pool) with every branch's
  last conv scaled by 0.3, and at He scale.

Methods (``--methods``):

* ``peel``: :func:`peel_jax.invert_network` with its default config, the strongest attack.
* ``peel_blockwise``: the paper's block-wise attack (``NetworkConfig.blockwise()``).
* ``peel_hybrid``: block-wise, then 40 prior-free iterations from the better start (the previous default).
* ``mv:LAMBDA``: Mahendran-Vedaldi with ``lambda_tv`` LAMBDA, given the wall time ``peel`` took on the same unit
  (its steps are set from a timed 50-step run; run ``peel`` first).

Each (network, layer, method) over the batch of images is one unit, written atomically to ``OUT/units/*.json`` when
done; a rerun skips finished units, so a killed run resumes. A finished unit run on other images, size or seed is
refused (exit status 2), never mixed into the table. Per image: PSNR, SSIM, the observation residual, and
the count certificate (:func:`peel_jax.certify_network` with ``lanczos_iters=0`` at the estimate: status, the
observation's null-space bound, and the one counted along the path).
``OUT/table.md`` is rebuilt from every finished unit.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import zlib

import numpy as np

NETWORKS = ("resnet18", "resnet50", "resnet18_bn", "resnet50_bn", "resnet18_trained", "paper_0.3", "paper_he")
LAYERS = ("maxpool", "layer1", "layer2", "layer3", "layer4")
BASE_METHODS = ("peel", "peel_blockwise", "peel_hybrid")
TRAINED_STEPS, TRAINED_SIZE = 300, 96  # resnet18_trained: Adam steps (batch 64) on the digits, at this side


def random_batch_stats(variables: dict, key) -> dict:
  """``variables`` with every BatchNorm's running mean ``~ N(0, 0.1^2)``, variance ``~ exp(N(0, 0.3^2))``, scale
  ``~ exp(N(0, 0.2^2))`` and bias ``~ N(0, 0.1^2)`` (each leaf its own key): statistics of the order a trained
  network's have, where Flax's init leaves an identity."""
  import jax
  import jax.numpy as jnp

  def draw(path, leaf, sd, log):
    k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) % (2**31))
    z = sd * jax.random.normal(k, leaf.shape, leaf.dtype)
    return jnp.exp(z) if log else z

  def stats(path, leaf):
    name = jax.tree_util.keystr(path)
    return draw(path, leaf, 0.1, False) if name.endswith("['mean']") else draw(path, leaf, 0.3, True)

  def params(path, leaf):
    name = jax.tree_util.keystr(path)
    if "bn" not in name.lower() and "downsample_1" not in name:
      return leaf
    return draw(path, leaf, 0.2, True) if name.endswith("['scale']") else draw(path, leaf, 0.1, False)

  out = dict(variables)
  out["batch_stats"] = jax.tree_util.tree_map_with_path(stats, variables["batch_stats"])
  out["params"] = jax.tree_util.tree_map_with_path(params, variables["params"])
  return out


def build_network(name: str, size: int, seed: int, cache_dir: str | None = None):
  """``(model, variables)`` of one ``--networks`` entry; ``resnet18_trained`` is trained once into ``cache_dir``."""
  import jax
  import jax.numpy as jnp

  from peel_jax import models
  from peel_jax.cli import scale_branches

  x = jnp.zeros((1, size, size, 3), jnp.float32)
  if name.startswith("paper"):
    model = models.resnet18(**models.paper_variant())
    return model, scale_branches(model.init(jax.random.key(seed), x), 0.3 if name == "paper_0.3" else 1.0)
  if name == "resnet18_trained":
    model, variables, stats = trained_resnet18(seed, cache_dir)
    print(f"deployed: resnet18_trained: {json.dumps(stats)}", flush=True)
    return model, variables
  model = models.get_model(name.removesuffix("_bn"))
  variables = model.init(jax.random.key(seed), x)
  if name.endswith("_bn"):
    variables = random_batch_stats(variables, jax.random.key(seed + 1))
  return model, variables


def trained_resnet18(seed: int, cache_dir: str | None, *, steps: int = TRAINED_STEPS, size: int = TRAINED_SIZE):
  """``(model, variables, stats)``: torchvision resnet18 trained by Adam on the bundled digits at ``size`` px
  (:func:`experiments._training.train_classifier`; its BatchNorm statistics stay at init). With ``cache_dir``,
  trained once per recipe: the variables are kept in ``cache_dir/resnet18_trained_s{seed}_{steps}steps_{size}px
  .msgpack`` and the stats (hold-out accuracy among them) beside it, ``+ '.json'``."""
  import functools

  import jax
  import jax.numpy as jnp

  from experiments import _training
  from peel_jax import data, images, models

  ds = data.load_images("bundled:digits", size=size)
  model = models.get_model("resnet18", num_classes=len(ds.label_names))
  x = images.normalize(ds.images)
  init = model.init(jax.random.key(seed), jnp.asarray(x[:1]))
  train = functools.partial(_training.train_classifier, model, init, x, ds.labels, key=jax.random.key(seed + 7),
                            steps=steps)
  if cache_dir is None:
    variables, stats = train()
  else:
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"resnet18_trained_s{seed}_{steps}steps_{size}px.msgpack")
    variables, stats = _training.cached_training(path, model, init, train)
  return model, variables, stats


def unit_name(network: str, layer: str, method: str) -> str:
  return f"{network}__{layer}__{method.replace(':', '-')}"


def solve(method: str, model, variables, observed, layer, image, peel_seconds: float | None):
  """``(x_hat, extra)`` of one method on a batch (``extra``: method-specific fields of the unit)."""
  import jax

  import peel_jax
  from peel_jax.baselines import mahendran_vedaldi

  if method.startswith("mv:"):
    if peel_seconds is None:
      raise SystemExit(f"{method} is given peel's wall time: run method peel on this unit first")
    lam = float(method[3:])
    args = (model, variables, observed, layer)
    for _ in range(2):  # the first call compiles; the second is timed
      t = time.perf_counter()
      mahendran_vedaldi(*args, key=jax.random.key(1), steps=50, lambda_tv=lam)[0].block_until_ready()
    steps = max(1, int(50 * peel_seconds / (time.perf_counter() - t)))
    x_hat, _ = mahendran_vedaldi(*args, key=jax.random.key(1), steps=steps, lambda_tv=lam)
    return x_hat, {"steps": steps}
  cfg = {"peel": peel_jax.NetworkConfig(),
         "peel_blockwise": peel_jax.NetworkConfig.blockwise(),
         "peel_hybrid": peel_jax.NetworkConfig.blockwise(refine_iters=40, refine_start="best")}[method]
  x_hat, rep = peel_jax.invert_network(model, variables, observed, layer, config=cfg, image=image)
  extra = {}
  if rep.refine is not None:
    extra = {"start": rep.refine.start, "with_prior": np.asarray(rep.refine.with_prior).tolist(),
             "refine_iterations": np.asarray(rep.refine.iterations).tolist(),
             "blockwise_psnr": np.asarray(rep.refine.blockwise["psnr"]).tolist()}
  return x_hat, extra


class MixedRun(Exception):
  """A finished unit in ``--out`` was run on other images, size or seed than this run asks for."""


def load_unit(path: str, names: list[str], size: int, seed: int) -> dict | None:
  """The finished unit at ``path`` (``None`` if absent); raises :class:`MixedRun` if its setting differs."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rec = json.load(f)
  ran = (rec["images"], rec.get("size", size), rec.get("seed", seed))  # records before size/seed: images only
  if ran != (names, size, seed):
    raise MixedRun(f"{path} was run on images {ran[0]} at size {ran[1]}, seed {ran[2]}; this run asks for {names} "
                   f"at size {size}, seed {seed}: use another --out")
  return rec


def run_unit(network, layer, method, model, variables, x, names, out, seed: int = 0):
  """Runs one unit (if not done) and returns its record."""
  import peel_jax
  from peel_jax import images, metrics
  from peel_jax.runs import write_json

  size = int(x.shape[1])
  path = os.path.join(out, "units", unit_name(network, layer, method) + ".json")
  rec = load_unit(path, names, size, seed)
  if rec is not None:
    return rec
  peel = load_unit(os.path.join(out, "units", unit_name(network, layer, "peel") + ".json"), names, size, seed)
  peel_seconds = None if peel is None else peel["seconds"]
  observed = peel_jax.features(model, variables, x, layer)[layer]
  t = time.perf_counter()
  x_hat, extra = solve(method, model, variables, observed, layer, x, peel_seconds)
  x_hat.block_until_ready()
  seconds = time.perf_counter() - t
  m = metrics.image_metrics(np.asarray(images.denormalize(x_hat)), np.asarray(images.denormalize(x)))
  cert = peel_jax.certify_network(model, variables, observed, layer, x_hat, lanczos_iters=0)
  rec = {"network": network, "layer": layer, "method": method, "images": names, "size": size, "seed": seed,
         "seconds": seconds, "seconds_per_image": seconds / len(names), "psnr": np.asarray(m["psnr"]).tolist(),
         "ssim": np.asarray(m["ssim"]).tolist(), "observation_residual": np.asarray(cert.observation_residual).tolist(),
         "status": list(cert.status), "null_dim_bound": np.asarray(cert.null_dim_bound).tolist(),
         "path_null_dim_bound": np.asarray(cert.path_null_dim_bound).tolist(), "path_layer": list(cert.path_layer),
         **extra}
  write_json(path, rec)
  return rec


def _spread(v, fmt) -> str:
  v = np.asarray(v, float)
  return f"{np.median(v):{fmt}} ({np.min(v):{fmt}}-{np.max(v):{fmt}})" if v.size > 1 else f"{v[0]:{fmt}}"


def _certificate_cell(r: dict) -> str:
  """The statuses and the smallest null-space bound: the observation's, or, where the observation's count allows
  determinacy, the one counted along the path at the estimate (with the layer attaining it)."""
  status = ", ".join(sorted(set(r["status"])))
  if min(r["null_dim_bound"]) > 0 or "path_null_dim_bound" not in r:
    return f"{status}, >= {min(r['null_dim_bound'])}"
  i = int(np.argmin(r["path_null_dim_bound"]))
  return f"{status}, >= {r['path_null_dim_bound'][i]} at the estimate ({r['path_layer'][i]})"


def markdown(records: list[dict]) -> str:
  """One row per (network, layer, method): the image count, PSNR and SSIM median (min-max), the largest observation
  residual, the certificate (:func:`_certificate_cell`), s/image."""
  lines = ["| network | observed | method | images | PSNR dB | SSIM | residual (max) | status, null-space bound | s/image |",
           "|---|---|---|---|---|---|---|---|---|"]
  order = {n: i for i, n in enumerate(NETWORKS)}
  for r in sorted(records, key=lambda r: (order.get(r["network"], 99), LAYERS.index(r["layer"]), r["method"])):
    lines.append(f"| {r['network']} | {r['layer']} | {r['method']} | {len(r['images'])} | "
                 f"{_spread(r['psnr'], '.1f')} | {_spread(r['ssim'], '.3f')} | {max(r['observation_residual']):.1e} | "
                 f"{_certificate_cell(r)} | {r['seconds_per_image']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="output directory (resumed if it holds finished units)")
  p.add_argument("--networks", default="resnet18_bn,paper_0.3", help=f"comma-separated, of {NETWORKS}")
  p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated, of {LAYERS}")
  p.add_argument("--methods", default="peel,peel_blockwise,peel_hybrid,mv:1e-3,mv:1e-2",
                 help=f"comma-separated, of {BASE_METHODS} and mv:LAMBDA")
  p.add_argument("--images", default="astronaut,chelsea,coffee,grace_hopper,lfw:0,lfw:1,lfw:2,lfw:3")
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  networks, layers, methods = (s.split(",") for s in (a.networks, a.layers, a.methods))
  bad = ([n for n in networks if n not in NETWORKS] + [l for l in layers if l not in LAYERS]
         + [m for m in methods if m not in BASE_METHODS and not m.startswith("mv:")])
  if bad:
    print(f"deployed: error: unknown network, layer or method {bad}", file=sys.stderr)
    return 2
  import jax.numpy as jnp

  from peel_jax import images

  names = a.images.split(",")
  x = jnp.asarray(images.normalize(np.stack([images.bundled(n, a.size) for n in names])))
  os.makedirs(os.path.join(a.out, "units"), exist_ok=True)
  for network in networks:
    model, variables = build_network(network, a.size, a.seed, os.path.join(a.out, "networks"))
    for layer in layers:
      if layer == "maxpool" and network.startswith("paper"):
        continue  # the paper variant has no stem pool
      for method in methods:
        try:
          rec = run_unit(network, layer, method, model, variables, x, names, a.out, a.seed)
        except MixedRun as e:
          print(f"deployed: error: {e}", file=sys.stderr)
          return 2
        print(markdown([rec]).splitlines()[-1], flush=True)
  records = []
  for path in sorted(glob.glob(os.path.join(a.out, "units", "*.json"))):
    with open(path) as f:
      records.append(json.load(f))
  from peel_jax.runs import write_text

  table = markdown(records)
  write_text(os.path.join(a.out, "table.md"), table + "\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
