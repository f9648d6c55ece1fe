import sys, time
import jax, jax.numpy as jnp, numpy as np
from peel_jax import models, images, metrics, blocks
from peel_jax._features import features
from peel_jax.solver import engine, lm
from peel_jax.solver.config import SolverConfig
from peel_jax.baselines.mahendran_vedaldi import mahendran_vedaldi
taus = [float(s) for s in sys.argv[1].split(",")]; iters = int(sys.argv[2]); layer = sys.argv[3]
size = 96
img = np.stack([images.bundled("astronaut", size), images.bundled("coffee", size)])
x = jnp.asarray(images.normalize(img))
model = models.ResNet(stage_sizes=(1,))
v = model.init(jax.random.key(0), x[:1])
y = features(model, v, x, layer)[layer]
stem = blocks.stem_block(model, v)
blk = blocks.residual_block(model, v, 0, 0)
lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x.shape[1:]) for b in images.pixel_box())

def soft_pool(r, tau):  # r (1,H,W,C): softmax-weighted 3x3/2 pad1 pool; tau=0 -> max
  if tau == 0:
    return blocks.pool(r, "max")
  H, W = r.shape[1], r.shape[2]
  rp = jnp.pad(r, ((0,0),(1,1),(1,1),(0,0)), constant_values=-1e4)
  pats = jnp.stack([rp[:, i:i+H:2, j:j+W:2, :] for i in range(3) for j in range(3)], 0)  # 9,1,Ho,Wo,C
  w = jax.nn.softmax(pats / tau, axis=0)
  return jnp.sum(w * jnp.where(pats < -1e3, 0.0, pats), 0)

def z_of(xi, tau):
  r = stem.act("relu")(stem.affine(0, xi[None]))
  h = soft_pool(r, tau)
  if layer == "maxpool":
    return h[0]
  return blk.pre_activation(h)[0]

yy = y
s = jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3)))
split = layer != "maxpool"

import functools
@functools.partial(jax.jit, static_argnums=(4,))
def lm_step(xb, yb, sb, st, tau, lam, mu, rho):
  def one(xi, yi, si, sti, li, mi):
    def res(t):
      z = z_of(t, tau)
      if split:
        c = jnp.where(yi > 0, z - yi, 0.0) / si
        g = jnp.where(yi > 0, 0.0, z) / si
        return (jnp.sqrt(rho) * (c + li / rho), jnp.sqrt(rho) * jax.nn.relu(g + mi / rho))
      return ((z - yi) / si,)
    return lm.step(res, xi, lo, hi, sti, 30)
  return jax.vmap(one)(xb, yb, sb, st, lam, mu)

@jax.jit
def true_res(xb):
  return jnp.linalg.norm((features(model, v, xb, layer)[layer] - y).reshape(2, -1), axis=1) / s

@functools.partial(jax.jit, static_argnums=(1,))
def cons(xb, tau):
  z = jax.vmap(lambda t: z_of(t, tau))(xb)
  return jnp.where(y > 0, z - y, 0.0) / s[:, None, None, None], jnp.where(y > 0, 0.0, z) / s[:, None, None, None]

x_mv, info = mahendran_vedaldi(model, v, y, layer, key=jax.random.key(1), steps=200)
print("mv residual", np.asarray(info.residual), flush=True)
xc = x_mv
t0 = time.perf_counter()
lam = jnp.zeros_like(y); mu = jnp.zeros_like(y); rho = 1.0
for tau in taus:
  st = jax.vmap(lambda _: lm.init(1e-3))(jnp.arange(2))
  for k in range(iters):
    xc, st = lm_step(xc, y, s, st, tau, lam, mu, rho)
    if split and (k + 1) % 5 == 0:
      c, g = cons(xc, tau)
      lam = lam + rho * c; mu = jax.nn.relu(mu + rho * g)
  print(f"tau {tau}: true residual {np.asarray(true_res(xc))} psnr {metrics.image_metrics(images.denormalize(xc), images.denormalize(x))['psnr']} t {time.perf_counter()-t0:.0f}", flush=True)
