import time, jax, jax.numpy as jnp, numpy as np
from peel_jax import models, images
from peel_jax._features import features
from peel_jax.problems.preimage import natural_preimage
from peel_jax.solver.config import SolverConfig
from peel_jax.baselines.mahendran_vedaldi import pixel_scale, objective_terms
img = np.stack([images.bundled("astronaut", 96), images.bundled("coffee", 96)])
x = jnp.asarray(images.normalize(img))
model = models.ResNet(stage_sizes=(1,))
v = model.init(jax.random.key(0), x[:1])
y = features(model, v, x, "relu")["relu"]
lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x.shape[1:]) for b in images.pixel_box())
x0 = jnp.broadcast_to((lo + hi) / 2, x.shape) + 0.05 * jax.random.normal(jax.random.key(3), x.shape)
t0 = time.perf_counter()
xh, k, res = natural_preimage(model, v, "relu", y, x0, box=(lo, hi), lambda_tv=1e-3, pixel_scale=pixel_scale("imagenet"), config=SolverConfig(tol=1e-5, cg_iters=30, rho=10.0), iters=20)
print(np.asarray(res), np.asarray(k), time.perf_counter() - t0)
tv = lambda t: objective_terms(model, v, y, "relu", t)["tv"]
print(np.asarray(tv(xh)), np.asarray(tv(x)), float(jnp.max(jnp.abs(xh - x))))
