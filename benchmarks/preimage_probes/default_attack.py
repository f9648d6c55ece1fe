"""The default attack (``NetworkConfig()``) against Mahendran-Vedaldi at the same wall time, torchvision resnet18.

    python benchmarks/preimage_probes/default_attack.py --layers maxpool,layer1,layer2 --images grace_hopper
    python benchmarks/preimage_probes/default_attack.py --arch resnet50 --layers layer1 --mv-lams "" \
        --config '{"prior": "tv"}'

``--arch``: any torchvision architecture of :mod:`peel_jax.models`, seeded random init. ``--mv-lams ""`` skips M-V.

Per layer and image: the default's observation residual, PSNR, where it started and whether the prior acted; then
M-V (each ``--mv-lams`` value) given the default's wall time (steps from a timed 50-step run). One JSON line each.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import peel_jax
from peel_jax import images, metrics, models
from peel_jax.baselines import mahendran_vedaldi

p = argparse.ArgumentParser()
p.add_argument("--arch", default="resnet18")
p.add_argument("--layers", default="maxpool,layer1,layer2")
p.add_argument("--images", default="grace_hopper")
p.add_argument("--size", type=int, default=128)
p.add_argument("--mv-lams", default="1e-3,1e-2")
p.add_argument("--config", default="{}", help="NetworkConfig overrides as JSON")
a = p.parse_args()

model = models.get_model(a.arch)
names = a.images.split(",")
x = jnp.asarray(images.normalize(np.stack([images.bundled(n, a.size) for n in names])))
v = model.init(jax.random.key(0), x[:1])
feats = peel_jax.features(model, v, x)
cfg = peel_jax.NetworkConfig(**json.loads(a.config))


def score(xh):
  return metrics.image_metrics(np.asarray(images.denormalize(xh)), np.asarray(images.denormalize(x)))


for layer in a.layers.split(","):
  t = time.perf_counter()
  xh, rep = peel_jax.invert_network(model, v, feats[layer], layer, config=cfg, image=x)
  wall = time.perf_counter() - t
  print(json.dumps({"arch": a.arch, "layer": layer, "method": "default", "config": json.loads(a.config),
                    "images": names,
                    "psnr": np.round(rep.psnr, 2).tolist(), "residual": np.asarray(rep.observation_residual).tolist(),
                    "start": rep.refine.start, "with_prior": np.asarray(rep.refine.with_prior).tolist(),
                    "blockwise_psnr": np.round(rep.refine.blockwise["psnr"], 2).tolist(),
                    "iters": np.asarray(rep.refine.iterations).tolist(), "wall_s": round(wall, 1)}), flush=True)
  if not a.mv_lams:
    continue
  t = time.perf_counter()
  mahendran_vedaldi(model, v, feats[layer], layer, key=jax.random.key(1), steps=50)[0].block_until_ready()
  t = time.perf_counter()
  mahendran_vedaldi(model, v, feats[layer], layer, key=jax.random.key(1), steps=50)[0].block_until_ready()
  steps = int(50 * wall / (time.perf_counter() - t))
  for lam in [float(s) for s in a.mv_lams.split(",") if s]:
    t = time.perf_counter()
    xm, info = mahendran_vedaldi(model, v, feats[layer], layer, key=jax.random.key(1), steps=steps, lambda_tv=lam)
    m = score(xm)
    print(json.dumps({"layer": layer, "method": f"mv lambda_tv {lam:g}", "steps": steps,
                      "psnr": np.round(m["psnr"], 2).tolist(), "residual": np.asarray(info.residual).tolist(),
                      "wall_s": round(time.perf_counter() - t, 1)}), flush=True)
