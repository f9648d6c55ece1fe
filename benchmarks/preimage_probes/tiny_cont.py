import sys, time
import jax, jax.numpy as jnp, numpy as np
from peel_jax import models, images, metrics
from peel_jax._features import features
from peel_jax.problems import preimage as P
from peel_jax.solver import engine
from peel_jax.solver.config import SolverConfig
from peel_jax.baselines.mahendran_vedaldi import mahendran_vedaldi, pixel_scale, objective_terms
size = 96; lam = float(sys.argv[1]); slopes = [float(s) for s in sys.argv[2].split(",")]; iters = int(sys.argv[3])
layer = "layer1"
img = np.stack([images.bundled("astronaut", size), images.bundled("coffee", size)])
x = jnp.asarray(images.normalize(img))
model = models.ResNet(stage_sizes=(1,))
v = model.init(jax.random.key(0), x[:1])
y = features(model, v, x, layer)[layer]
lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x.shape[1:]) for b in images.pixel_box())
B = pixel_scale("imagenet")
x_mv, info = mahendran_vedaldi(model, v, y, layer, key=jax.random.key(1), steps=200)
print("mv residual", np.asarray(info.residual))
before, last = P.split_point(model, v, layer)
hw = size * size
weight = jnp.asarray((lam / hw) ** 0.5 * P.TV_RATIO / B, jnp.float32)
scale = jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3)))
xc = x_mv
cfg = SolverConfig(tol=1e-5, cg_iters=30)
t0 = time.perf_counter()
for a in slopes:
  m = model if a == 0 else models.ResNet(stage_sizes=(1,), activation="leaky_relu", negative_slope=a)
  from peel_jax import blocks
  lst = blocks.residual_block(m, v, 0, 0)
  net = P.PreimageNet(v, lst, lo, hi, m, layer, before)
  st = engine.solve(P.NATURAL_PREIMAGE, cfg, xc, P.PreimageData(y, scale, jnp.full(scale.shape, weight)), net, method=engine.LM, budget=iters)
  xc = st.u
  true_res = np.asarray(jnp.linalg.norm((features(model, v, xc, layer)[layer] - y).reshape(2, -1), axis=1) / scale)
  print(f"slope {a}: surrogate merit {np.asarray(st.merit)} true residual {true_res} psnr {metrics.image_metrics(images.denormalize(xc), images.denormalize(x))['psnr']} t {time.perf_counter()-t0:.0f}", flush=True)
tv = lambda t: objective_terms(model, v, y, layer, t)["tv"]
print("tv found", np.asarray(tv(xc)), "tv true", np.asarray(tv(x)))
