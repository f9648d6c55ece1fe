"""Probe (issue 10): an exact preimage PAST the max-pool, by lifting the pooled values to variables.

Observed at `layer1` of a torchvision-style network, the end-to-end equality through the pool stalls at 2-4%
observation residual: the gradient of a max reaches the current argmax alone, so a Gauss-Newton step cannot push a
non-argmax pre-pool value down below the value its window must take. Here the pooled map m is a variable of its own:

  min_{x, m}  (lambda_tv / 2) TV(x)
  s.t.        max(0, max_{q in w} z_q(x)) = m_w     (attain; z = bn(conv(x)), affine in x)
              z_q(x) <= m_w   for every q in w      (the link's inequalities: they see every position)
              layer1(m) = y   split at the post-add ReLU: = where y > 0, <= 0 where y = 0
              lo <= x <= hi,  m >= 0

The attain equality and the inequalities together say m = maxpool(relu(z(x))) exactly; the inequalities are
redundant at a feasible point but not in a linearised step, which is the point. The merit is the true end-to-end
observation residual of x alone.

  python benchmarks/preimage_probes/lifted_pool.py [--net tiny|resnet18] [--iters N] [--rho R] [--start mv|blockwise]

Compared with `natural_preimage` (the equality through the pool, what the default attack runs past the pool)
from the same start and iteration budget.
"""
import argparse
import time
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_numpy_rank_promotion", "raise")
from peel_jax import blocks, images, metrics, models  # noqa: E402
from peel_jax._features import features  # noqa: E402
from peel_jax.baselines.mahendran_vedaldi import mahendran_vedaldi, objective_terms, pixel_scale  # noqa: E402
from peel_jax.problems.pool_choice import windows  # noqa: E402
from peel_jax.problems.preimage import TV_RATIO, natural_preimage, tv_vector  # noqa: E402
from peel_jax.solver import engine  # noqa: E402
from peel_jax.solver.config import SolverConfig  # noqa: E402


@flax.struct.dataclass
class Net:
  stem: Any
  layer: tuple  # the blocks from the pool's output to `layer`, forward order
  lo: jax.Array
  hi: jax.Array


class Data(NamedTuple):
  y: jax.Array
  yscale: jax.Array
  mscale: jax.Array
  weight: jax.Array


def pre_pool(x, net):
  return net.stem.affine(0, x[None])[0]


def pre_relu(m, net):
  h = m[None]
  for b in net.layer[:-1]:
    h = b(h)
  return net.layer[-1].pre_activation(h)[0]


def terms(u, d: Data, net: Net):
  wz = windows(pre_pool(u["x"], net), -jnp.inf)
  top = jnp.maximum(0.0, jnp.max(wz, axis=0))
  link = jnp.where(jnp.isfinite(wz), wz - u["m"][None], 0.0)
  z1 = pre_relu(u["m"], net)
  eq = (top - u["m"]) / d.mscale, jnp.where(d.y > 0, z1 - d.y, 0.0) / d.yscale
  ineq = link / d.mscale, jnp.where(d.y > 0, 0.0, z1) / d.yscale
  return (), eq, ineq


def objective(u, d: Data, net: Net):
  return tv_vector(u["x"], d.weight)


def bounds(u, d, net: Net):
  return {"x": net.lo, "m": jnp.zeros_like(u["m"])}, {"x": net.hi, "m": jnp.full_like(u["m"], jnp.inf)}


def forward(x, net):
  m = blocks.pool(jax.nn.relu(pre_pool(x, net))[None], "max")[0]
  return jax.nn.relu(pre_relu(m, net))


def merit(u, d: Data, net: Net):
  return jnp.sqrt(jnp.sum((forward(u["x"], net) - d.y) ** 2)) / d.yscale


def no_residual(u, d, net):
  return ()


LIFTED = engine.Problem(residual=no_residual, bounds=bounds, merit=merit, objective=objective, terms=terms)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--net", default="tiny", choices=["tiny", "resnet18"])
  ap.add_argument("--layer", default="layer1")
  ap.add_argument("--images", default="astronaut,coffee")
  ap.add_argument("--size", type=int, default=96)
  ap.add_argument("--iters", type=int, default=100)
  ap.add_argument("--rho", type=float, default=1.0)
  ap.add_argument("--cg", type=int, default=30)
  ap.add_argument("--inner", type=int, default=5)
  ap.add_argument("--lam", type=float, default=1e-3, help="lambda_tv of the prior (M-V units)")
  ap.add_argument("--mv-steps", type=int, default=200)
  ap.add_argument("--baseline-rho", type=float, default=0.1, help="natural_preimage's rho (the default past a pool)")
  ap.add_argument("--no-baseline", action="store_true")
  A = ap.parse_args()

  names = A.images.split(",")
  x = jnp.asarray(images.normalize(np.stack([images.bundled(n, A.size) for n in names])))
  model = models.ResNet(stage_sizes=(1,)) if A.net == "tiny" else models.resnet18()
  v = model.init(jax.random.key(0), x[:1])
  y = features(model, v, x, A.layer)[A.layer]
  stage = int(A.layer[-1]) - 1
  layer_blocks = tuple(b for s in range(stage + 1) for b in blocks.stage_blocks(model, v, s).blocks())
  lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x.shape[1:]) for b in images.pixel_box())
  net = Net(blocks.stem_block(model, v), layer_blocks, lo, hi)
  assert float(jnp.max(jnp.abs(jax.vmap(lambda t: forward(t, net))(x) - y))) < 1e-4, "the probe's forward is wrong"
  print("nonzero", np.asarray(jnp.sum(y > 0, axis=(1, 2, 3))), "pixels", x[0].size)

  B = pixel_scale("imagenet")
  t0 = time.perf_counter()
  x_mv, info = mahendran_vedaldi(model, v, y, A.layer, key=jax.random.key(1), steps=A.mv_steps)
  print(f"M-V start: residual {np.asarray(info.residual)}, {time.perf_counter() - t0:.1f} s")
  tv = lambda t: np.asarray(objective_terms(model, v, y, A.layer, t)["tv"])
  psnr = lambda t: metrics.image_metrics(images.denormalize(t), images.denormalize(x))["psnr"]
  print("true TV", tv(x), "start PSNR", psnr(x_mv), "start TV", tv(x_mv))

  hw = A.size * A.size
  weight = jnp.full((len(names),), np.sqrt(A.lam / hw) * TV_RATIO / B, jnp.float32)
  yscale = jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3)))
  m0 = jax.vmap(lambda t: blocks.pool(jax.nn.relu(pre_pool(t, net))[None], "max")[0])(x_mv)
  mscale = jnp.sqrt(jnp.sum(m0 * m0, axis=(1, 2, 3)))
  cfg = SolverConfig(rho=A.rho, cg_iters=A.cg, inner_iters=A.inner, tol=1e-5)
  t0 = time.perf_counter()
  st = engine.solve(LIFTED, cfg, {"x": x_mv, "m": m0}, Data(y, yscale, mscale, weight), net, method=engine.LM,
                    budget=A.iters)
  xl = jax.block_until_ready(st.best_u["x"])
  print(f"lifted: residual {np.asarray(st.best_merit)}, iters {np.asarray(st.k)}, PSNR {psnr(xl)}, TV {tv(xl)}, "
        f"{time.perf_counter() - t0:.1f} s")
  _, eq, ineq = jax.vmap(terms, in_axes=(0, 0, None))(st.u, Data(y, yscale, mscale, weight), net)
  norm = lambda t: np.asarray(jnp.sqrt(jnp.sum(t * t, axis=tuple(range(1, t.ndim)))))
  print("last iterate: attain", norm(eq[0]), "link", norm(jax.nn.relu(ineq[0])), "y eq", norm(eq[1]),
        "y ineq", norm(jax.nn.relu(ineq[1])), "merit", np.asarray(st.merit))
  if A.no_baseline:
    return
  t0 = time.perf_counter()
  xb, k, res = natural_preimage(model, v, A.layer, y, x_mv, box=(lo, hi), lambda_tv=A.lam, pixel_scale=B,
                                config=SolverConfig(rho=A.baseline_rho, cg_iters=A.cg, tol=1e-5), iters=A.iters)
  xb = jax.block_until_ready(xb)
  print(f"natural_preimage (equality through the pool): residual {np.asarray(res)}, iters {np.asarray(k)}, "
        f"PSNR {psnr(xb)}, TV {tv(xb)}, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
  main()
