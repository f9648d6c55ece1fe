"""Probe (issue 10): past the max-pool, alternate an exact fit of layer1 in the pooled map with the exact
chosen-maxima solve of the stem (the solver that is exact from `maxpool`).

Round r, from the pixels x:
  1. m* = maxpool(relu(z(x)));
  2. m^ = argmin ||m - m*||^2  s.t. layer1(m) = y (split at the post-add ReLU), m >= 0   (the nearest pooled map
     that reproduces the observation: the projection onto the observation's preimage set in pooled space);
  3. x = choose_maxima(stem, m^, from x)  (min TV s.t. maxpool(relu(z(x))) = m^, the window maxima chosen).
The merit is the end-to-end observation residual of x. If m^ lies in the stem's range, step 3 is exact and so is x.

  python benchmarks/preimage_probes/alternate_pool.py [--rounds R] [--proj-iters N] [--choice-iters N] [--net ...]
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
from peel_jax.problems import pool_choice  # noqa: E402
from peel_jax.problems.preimage import TV_RATIO, natural_preimage  # noqa: E402
from peel_jax.solver import engine  # noqa: E402
from peel_jax.solver.config import SolverConfig  # noqa: E402


@flax.struct.dataclass
class Net:
  layer: tuple  # the blocks from the pool's output to `layer`


class Data(NamedTuple):
  y: jax.Array
  yscale: jax.Array
  anchor: jax.Array  # m*
  weight: jax.Array  # the proximity's weight


def pre_relu(m, net):
  h = m[None]
  for b in net.layer[:-1]:
    h = b(h)
  return net.layer[-1].pre_activation(h)[0]


def terms(m, d: Data, net: Net):
  z1 = pre_relu(m, net)
  return (), jnp.where(d.y > 0, z1 - d.y, 0.0) / d.yscale, jnp.where(d.y > 0, 0.0, z1) / d.yscale


def objective(m, d: Data, net):
  return d.weight * (m - d.anchor)


def bounds(m, d, net):
  return jnp.zeros_like(m), jnp.full_like(m, jnp.inf)


def merit(m, d: Data, net):
  return jnp.sqrt(jnp.sum((jax.nn.relu(pre_relu(m, net)) - d.y) ** 2)) / d.yscale


PROJECT = engine.Problem(residual=lambda m, d, n: (), bounds=bounds, merit=merit, objective=objective, terms=terms)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--net", default="tiny", choices=["tiny", "resnet18"])
  ap.add_argument("--images", default="astronaut,coffee")
  ap.add_argument("--size", type=int, default=96)
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument("--proj-iters", type=int, default=40)
  ap.add_argument("--proj-weight", type=float, default=1e-2, help="proximity weight (relative units)")
  ap.add_argument("--choice-iters", type=int, default=100)
  ap.add_argument("--fit", default="choice", choices=["choice", "equality"], help="step 3's solver")
  ap.add_argument("--fit-rho", type=float, default=0.1)
  ap.add_argument("--oracle", action="store_true", help="diagnostic: step 3 fits the TRUE pooled map")
  ap.add_argument("--lam", type=float, default=1e-3)
  ap.add_argument("--mv-steps", type=int, default=200)
  ap.add_argument("--start-iters", type=int, default=0, help="natural_preimage iterations before the rounds")
  A = ap.parse_args()

  names = A.images.split(",")
  x = jnp.asarray(images.normalize(np.stack([images.bundled(n, A.size) for n in names])))
  model = models.ResNet(stage_sizes=(1,)) if A.net == "tiny" else models.resnet18()
  v = model.init(jax.random.key(0), x[:1])
  layer = "layer1"
  y = features(model, v, x, layer)[layer]
  m_true = features(model, v, x, "maxpool")["maxpool"]
  stem = blocks.stem_block(model, v)
  net = Net(tuple(blocks.stage_blocks(model, v, 0).blocks()))
  lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x.shape[1:]) for b in images.pixel_box())
  B = pixel_scale("imagenet")
  psnr = lambda t: metrics.image_metrics(images.denormalize(t), images.denormalize(x))["psnr"]
  tv = lambda t: np.asarray(objective_terms(model, v, y, layer, t)["tv"])
  pooled = lambda t: features(model, v, t, "maxpool")["maxpool"]
  residual = lambda t: np.asarray(jnp.sqrt(jnp.sum((features(model, v, t, layer)[layer] - y) ** 2, axis=(1, 2, 3)))
                                  / jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3))))
  rel = lambda a, b: np.asarray(jnp.sqrt(jnp.sum((a - b) ** 2, axis=(1, 2, 3)) / jnp.sum(b * b, axis=(1, 2, 3))))

  t0 = time.perf_counter()
  xs, _ = mahendran_vedaldi(model, v, y, layer, key=jax.random.key(1), steps=A.mv_steps)
  if A.start_iters:
    xs, _, _ = natural_preimage(model, v, layer, y, xs, box=(lo, hi), lambda_tv=A.lam, pixel_scale=B,
                                config=SolverConfig(rho=0.1, cg_iters=30, tol=1e-5), iters=A.start_iters)
  print(f"start: residual {residual(xs)}, PSNR {psnr(xs)}, pooled error {rel(pooled(xs), m_true)}, "
        f"{time.perf_counter() - t0:.0f} s", flush=True)
  yscale = jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3)))
  n, hw = len(names), A.size * A.size
  weight = jnp.full((n,), np.sqrt(A.lam / hw) * TV_RATIO / B, jnp.float32)
  best = (residual(xs), xs)
  for r in range(A.rounds):
    t0 = time.perf_counter()
    ms = pooled(xs)
    pw = A.proj_weight / jnp.sqrt(jnp.sum(ms * ms, axis=(1, 2, 3)))
    st = engine.solve(PROJECT, SolverConfig(rho=10.0, cg_iters=30, tol=1e-6), ms, Data(y, yscale, ms, pw), net,
                      method=engine.LM, budget=A.proj_iters)
    mh = m_true if A.oracle else st.best_u  # the oracle reads the truth: a diagnostic, never an attacker's
    if A.fit == "choice":
      xs, k, res_pool = pool_choice.choose_maxima(stem, mh, xs, lo, hi, weight,
                                                  SolverConfig(rho=100.0, cg_iters=10, tol=5e-5), iters=A.choice_iters)
    else:  # the equality through the pool, soft penalty
      xs, k, res_pool = natural_preimage(model, v, "maxpool", mh, xs, box=(lo, hi), lambda_tv=A.lam, pixel_scale=B,
                                         config=SolverConfig(rho=A.fit_rho, cg_iters=30, tol=1e-5),
                                         iters=A.choice_iters, choice=None)
    res = residual(xs)
    best = (np.minimum(best[0], res), jnp.where(jnp.asarray(res < best[0])[:, None, None, None], xs, best[1]))
    print(f"round {r}: projection residual {np.asarray(st.best_merit)}, moved {rel(mh, ms)}, m^ vs true "
          f"{rel(mh, m_true)}; pool fit {np.asarray(res_pool)}; layer1 residual {res}, PSNR {psnr(xs)}, TV {tv(xs)}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
  print("best residual", best[0], "PSNR", psnr(best[1]), "true TV", tv(x))


if __name__ == "__main__":
  main()
