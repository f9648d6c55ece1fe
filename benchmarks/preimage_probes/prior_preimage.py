"""Prototype: min TV2(x) s.t. f(x)=y (split at ReLU), AL + LM, torchvision resnet18 128px."""
import sys, time, functools
import jax, jax.numpy as jnp, numpy as np
from peel_jax import models, images, blocks, metrics
from peel_jax._features import features
from peel_jax.solver import lm
from peel_jax.baselines.mahendran_vedaldi import mahendran_vedaldi, TV_RATIO, pixel_scale

layer = sys.argv[1] if len(sys.argv) > 1 else "layer1"
lam_tv = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-2
mv_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 400
iters = int(sys.argv[4]) if len(sys.argv) > 4 else 60
cg = int(sys.argv[5]) if len(sys.argv) > 5 else 30
inner = int(sys.argv[6]) if len(sys.argv) > 6 else 5
rho0 = float(sys.argv[7]) if len(sys.argv) > 7 else 1.0
img_name = sys.argv[8] if len(sys.argv) > 8 else "grace_hopper"
mv_lam = float(sys.argv[9]) if len(sys.argv) > 9 else 3e-2

img = images.bundled(img_name, 128)
x_true = jnp.asarray(images.normalize(img))[None]
model = models.resnet18()
variables = model.init(jax.random.key(0), x_true)
stage = int(layer[5]) - 1
nblk = model.stage_sizes[stage]
last = blocks.residual_block(model, variables, stage, nblk - 1)
prev = f"layer{stage+1}.{nblk-2}"
y = features(model, variables, x_true, layer)[layer]
lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x_true.shape[1:]) for b in images.pixel_box())
B = pixel_scale("imagenet"); V = B / TV_RATIO
HW = x_true.shape[1] * x_true.shape[2]

def zfun(x):  # one image
  h = features(model, variables, x[None], prev)[prev]
  return last.pre_activation(h)[0]

def D(x):
  dj = jnp.concatenate([x[:, 1:] - x[:, :-1], jnp.zeros_like(x[:, :1])], 1)
  di = jnp.concatenate([x[1:] - x[:-1], jnp.zeros_like(x[:1])], 0)
  return dj, di

yy = y[0]
pos = yy > 0
s = jnp.sqrt(jnp.sum(yy * yy))

def al_res(x, lam, mu, rho):
  z = zfun(x)
  c = jnp.where(pos, z - yy, 0.0) / s
  g = jnp.where(pos, 0.0, z) / s
  dj, di = D(x)
  w = jnp.sqrt(lam_tv / HW) / V
  return (w * dj, w * di, jnp.sqrt(rho) * (c + lam / rho), jnp.sqrt(rho) * jax.nn.relu(g + mu / rho))

@jax.jit
def step(x, lam, mu, rho, st):
  return lm.step(lambda t: al_res(t, lam, mu, rho), x, lo, hi, st, cg)

@jax.jit
def measures(x):
  z = zfun(x)
  c = jnp.where(pos, z - yy, 0.0) / s
  g = jnp.where(pos, 0.0, z) / s
  obs = jnp.linalg.norm(jax.nn.relu(z) - yy) / s
  dj, di = D(x)
  tv = (jnp.sum(dj**2) + jnp.sum(di**2)) / (HW * V * V)
  return c, g, obs, tv

def psnr(x):
  return float(metrics.image_metrics(images.denormalize(x[None]), images.denormalize(x_true))["psnr"][0])

t0 = time.perf_counter()
if mv_steps > 0:
  xs, info = mahendran_vedaldi(model, variables, y, layer, key=jax.random.key(1), steps=mv_steps, lambda_tv=mv_lam)
  x = xs[0]
else:
  x = jnp.clip(jnp.zeros_like(x_true[0]), lo, hi)
t_mv = time.perf_counter() - t0
c, g, obs, tv = measures(x)
print(f"start: M-V {mv_steps} steps lam {mv_lam}: psnr {psnr(x):.2f} obs {float(obs):.3e} tv {float(tv):.3f} ({t_mv:.1f}s) true tv {float(measures(x_true[0])[3]):.3f}", flush=True)
lam = jnp.zeros_like(yy); mu = jnp.zeros_like(yy); rho = jnp.float32(rho0)
st = lm.init(1e-3)
t1 = time.perf_counter()
for k in range(1, iters + 1):
  x, st = step(x, lam, mu, rho, st)
  if k % inner == 0:
    c, g, obs, tv = measures(x)
    lam = lam + rho * c
    mu = jax.nn.relu(mu + rho * g)
  if k % 5 == 0:
    c, g, obs, tv = measures(x)
    print(f"{k:4d} psnr {psnr(x):6.2f} obs {float(obs):.3e} viol_eq {float(jnp.linalg.norm(c)):.2e} viol_in {float(jnp.linalg.norm(jax.nn.relu(g))):.2e} tv {float(tv):.3f} damp {float(st.damping):.1e} t {time.perf_counter()-t1:.1f}", flush=True)
