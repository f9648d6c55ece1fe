import sys, time
import jax, jax.numpy as jnp, numpy as np
from peel_jax import models, images
from peel_jax._features import features
from peel_jax.problems.preimage import natural_preimage, tv_vector, TV_RATIO
from peel_jax.solver.config import SolverConfig
from peel_jax.baselines.mahendran_vedaldi import mahendran_vedaldi, pixel_scale, objective_terms
size = int(sys.argv[1]) if len(sys.argv) > 1 else 96
lam = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3
iters = int(sys.argv[3]) if len(sys.argv) > 3 else 40
layer = sys.argv[4] if len(sys.argv) > 4 else "layer1"
img = np.stack([images.bundled("astronaut", size), images.bundled("coffee", size)])
x = jnp.asarray(images.normalize(img))
model = models.ResNet(stage_sizes=(1,))
v = model.init(jax.random.key(0), x[:1])
y = features(model, v, x, layer)[layer]
print("nonzero", int((np.asarray(y[0]) > 0).sum()), "pixels", x[0].size, "obs", y[0].size)
lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x.shape[1:]) for b in images.pixel_box())
B = pixel_scale("imagenet")
t0 = time.perf_counter()
x_mv, info = mahendran_vedaldi(model, v, y, layer, key=jax.random.key(1), steps=200)
print("mv residual", np.asarray(info.residual), time.perf_counter() - t0)
t0 = time.perf_counter()
xh, k, res = natural_preimage(model, v, layer, y, x_mv, box=(lo, hi), lambda_tv=lam, pixel_scale=B,
                              config=SolverConfig(tol=1e-5, cg_iters=30), iters=iters)
print("pre residual", np.asarray(res), "iters", np.asarray(k), time.perf_counter() - t0)
tv = lambda t: objective_terms(model, v, y, layer, t)["tv"]
print("tv found", np.asarray(tv(xh)), "tv true", np.asarray(tv(x)), "tv mv", np.asarray(tv(x_mv)))
from peel_jax import metrics
print("psnr pre", metrics.image_metrics(images.denormalize(xh), images.denormalize(x))["psnr"], "mv", metrics.image_metrics(images.denormalize(x_mv), images.denormalize(x))["psnr"])
