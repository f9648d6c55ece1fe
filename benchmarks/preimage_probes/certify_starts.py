import json, time, jax, jax.numpy as jnp, numpy as np
from peel_jax import models, images, features
from peel_jax.cli import scale_branches
from peel_jax._certify_network import certify_network
x = jnp.asarray(images.normalize(images.bundled('grace_hopper', 128)))[None]
pv = models.resnet18(**models.paper_variant())
pv_vars = scale_branches(pv.init(jax.random.key(0), x), 0.3)
for layer in ["layer1"]:
  obs = features(pv, pv_vars, x, layer)[layer]
  t = time.time()
  c = certify_network(pv, pv_vars, obs, layer, x, lanczos_iters=0, starts=2, refine_iters=20)
  print(layer, c.status, "spread", c.spread, "exact", c.exact_starts, "s", round(time.time() - t, 1), flush=True)
