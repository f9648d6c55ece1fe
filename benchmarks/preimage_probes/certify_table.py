"""certify_network at 128 px: torchvision resnet18 (seeded random init) and the paper variant x0.3, truth as x_hat."""
import json, sys, time, jax, jax.numpy as jnp, numpy as np
from peel_jax import models, images, features
from peel_jax.cli import scale_branches
from peel_jax._certify_network import certify_network
iters = int(sys.argv[1]) if len(sys.argv) > 1 else 32
which = sys.argv[2] if len(sys.argv) > 2 else "all"
x = jnp.asarray(images.normalize(images.bundled('grace_hopper', 128)))[None]
tv = models.resnet18()
tv_vars = tv.init(jax.random.key(0), x)
pv = models.resnet18(**models.paper_variant())
pv_vars = scale_branches(pv.init(jax.random.key(0), x), 0.3)
cases = [("torchvision", tv, tv_vars, l) for l in ["maxpool", "layer1", "layer2", "layer3", "layer4"]]
cases += [("paper x0.3", pv, pv_vars, l) for l in ["layer1", "layer2", "layer3", "layer4"]]
if which != "all":
  cases = [c for c in cases if f"{c[0]}:{c[3]}" in which.split(",")]
for name, m, v, layer in cases:
  obs = features(m, v, x, layer)[layer]
  cold = certify_network(m, v, obs, layer, x, lanczos_iters=iters)
  c = certify_network(m, v, obs, layer, x, lanczos_iters=iters)
  d = c.to_dict()
  keep = {k: d[k] for k in ["status", "pixels", "observed_values", "nonzero_values", "informative_values",
                            "null_dim_bound", "free_pixels", "free_null_dim_bound", "sigma_max", "sigma_min",
                            "sigma_ratio", "singular_values", "observation_residual", "lanczos_iters"]}
  keep["seconds_warm"] = round(c.seconds, 2); keep["seconds_cold"] = round(cold.seconds, 2)
  print(name, layer, json.dumps(keep), flush=True)
