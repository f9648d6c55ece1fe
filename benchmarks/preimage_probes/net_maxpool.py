import sys, time, jax, jax.numpy as jnp, numpy as np
import peel_jax
from peel_jax import images, models
size = 128
img = images.bundled("grace_hopper", size)
x = jnp.asarray(images.normalize(img))[None]
model = models.resnet18()
v = model.init(jax.random.key(0), x)
feats = peel_jax.features(model, v, x)
for rho in [float(a) for a in sys.argv[1].split(",")]:
  cfg = peel_jax.NetworkConfig(refine_iters=200, refine_start="best", prior="tv", prior_rho=rho)
  t = time.perf_counter()
  xh, rep = peel_jax.invert_network(model, v, feats["maxpool"], "maxpool", config=cfg, image=x)
  print(f"rho={rho} psnr={float(np.ravel(rep.psnr)[0]):.2f} res={float(np.ravel(rep.observation_residual)[0]):.2e} from_prior={rep.refine.from_prior} iters={rep.refine.iterations} {time.perf_counter()-t:.1f}s", flush=True)
