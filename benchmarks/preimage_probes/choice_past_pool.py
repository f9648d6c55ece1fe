"""Probe (issue 10): past the max-pool, the window maxima CHOSEN, and the choice searched between rounds.

Observed at `layer1` (the blocks after the pool), with a choice a(w) of one offset per pooling window:
  h = relu(z_{a(w)})                       (z = A0 x: the stem before its ReLU and pool)
  layer1(h) = y where y > 0,  its last pre-activation <= 0 where y = 0,  z_q <= h_w for every q of window w.
With the choice fixed this is smooth in x (the equality through the pool is not). Rounds of the engine's AL + LM
with the choice fixed, then a re-choice:
  argmax  a(w) = the offset of largest z (a DCA step);
  mult    where another offset's multiplier says it presses on the chosen maximum (mu > 0), move to the offset with
          the largest multiplier (an active-set move), and zero that window's multipliers;
  fixed   never.
--oracle solves with the true choice (a diagnostic, never an attacker's). The `agree` column reads the truth too.

  python benchmarks/preimage_probes/choice_past_pool.py --start natural --rule mult --rounds 10 --iters 20
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
from peel_jax.problems.pool_choice import WINDOW, chosen, gap, pick, windows  # noqa: E402
from peel_jax.problems.preimage import TV_RATIO, natural_preimage, tv_vector  # noqa: E402
from peel_jax.solver import engine  # noqa: E402
from peel_jax.solver.config import SolverConfig  # noqa: E402


@flax.struct.dataclass
class Net:
  stem: Any
  layer: tuple  # the blocks from the pool's output to `layer`
  lo: jax.Array
  hi: jax.Array


class Data(NamedTuple):
  y: jax.Array
  cand: jax.Array  # (9, Ho, Wo, C): offsets inside the map
  a: jax.Array  # (Ho, Wo, C) int32
  active: jax.Array  # (Ho, Wo, C) bool: windows whose choice is fixed (elsewhere the max-pool itself)
  scale: jax.Array  # ||y||
  weight: jax.Array  # the TV prior's weight


def stem_z(x, net: Net):
  return net.stem.affine(0, x[None])[0]


def block_pre(h, net: Net):
  h = h[None]
  for b in net.layer[:-1]:
    h = b(h)
  return net.layer[-1].pre_activation(h)[0]


def terms(x, d: Data, net: Net):
  z = stem_z(x, net)
  h = jnp.where(d.active, jax.nn.relu(chosen(z, d.a)), blocks.pool(jax.nn.relu(z)[None], "max")[0])
  z1 = block_pre(h, net)
  gw = jnp.where(d.cand & d.active[None], windows(z, 0.0) - h[None], 0.0)
  return (), jnp.where(d.y > 0, z1 - d.y, 0.0) / d.scale, (jnp.where(d.y > 0, 0.0, z1) / d.scale, gw / d.scale)


def objective(x, d: Data, net: Net):
  return tv_vector(x, d.weight)


def bounds(x, d, net: Net):
  return net.lo, net.hi


def merit(x, d: Data, net: Net):
  h = blocks.pool(jax.nn.relu(stem_z(x, net))[None], "max")
  for b in net.layer:
    h = b(h)
  return jnp.sqrt(jnp.sum((h[0] - d.y) ** 2)) / d.scale


PROBLEM = engine.Problem(residual=lambda x, d, n: (), bounds=bounds, merit=merit, objective=objective, terms=terms)


def in_map(shape):
  """(9, Ho, Wo, C) bool: the window offsets that fall inside the map (not padding)."""
  ho, wo, c = shape
  rows = (2 * jnp.arange(ho)[None, :] - 1 + jnp.arange(WINDOW)[:, None] // 3) >= 0
  cols = (2 * jnp.arange(wo)[None, :] - 1 + jnp.arange(WINDOW)[:, None] % 3) >= 0
  return jnp.broadcast_to(rows[:, :, None, None] & cols[:, None, :, None], (WINDOW, ho, wo, c))


def mult_move(st, d: Data, thresh: float):
  """The active-set move: per window, the offset with the largest inequality multiplier if above `thresh`."""
  mu = st.mu[1]  # (n, 9, Ho, Wo, C)
  other = d.cand & (jnp.arange(WINDOW)[None, :, None, None, None] != d.a[:, None])
  score = jnp.where(other, mu, -jnp.inf)
  go = jnp.max(score, axis=1) > thresh
  a = jnp.where(go, jnp.argmax(score, axis=1).astype(jnp.int32), d.a)
  mu = jnp.where(go[:, None], 0.0, mu)
  return a, go, st._replace(mu=(st.mu[0], mu))


def commit(g, active, share):
  """``active`` plus, per image, the ``share`` of the other windows with the largest gap."""
  rest = jnp.where(active, -jnp.inf, g)
  k = jnp.ceil(share * jnp.sum(~active, axis=(1, 2, 3))).astype(jnp.int32)
  thr = jax.vmap(lambda r, kk: jnp.sort(r.ravel())[::-1][jnp.maximum(kk - 1, 0)])(rest, k)
  return active | (rest >= thr[:, None, None, None])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--net", default="tiny", choices=["tiny", "resnet18"])
  ap.add_argument("--images", default="astronaut,coffee")
  ap.add_argument("--size", type=int, default=96)
  ap.add_argument("--start", default="natural", choices=["mv", "natural"])
  ap.add_argument("--mv-steps", type=int, default=200)
  ap.add_argument("--natural-iters", type=int, default=100)
  ap.add_argument("--rule", default="mult", choices=["argmax", "mult", "fixed", "commit"])
  ap.add_argument("--thresh", type=float, default=0.0, help="mult rule: the multiplier above which a window moves")
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--rho", type=float, default=10.0)
  ap.add_argument("--cg", type=int, default=30)
  ap.add_argument("--lam", type=float, default=1e-3)
  ap.add_argument("--commit", type=float, default=1.0,
                  help="< 1: fix this fraction of the windows at first (largest gap first), a further such fraction "
                       "of the rest each round (re-chosen by argmax before); the rest stay the max-pool")
  ap.add_argument("--reset", action="store_true", help="fresh multipliers every round")
  ap.add_argument("--oracle", action="store_true", help="diagnostic: the true choice, fixed")
  ap.add_argument("--oracle-mix", type=float, default=None,
                  help="diagnostic: the true choice, except the start's where the true z there is within this "
                       "fraction of the window's true maximum (are near-ties benign?)")
  A = ap.parse_args()

  names = A.images.split(",")
  x = jnp.asarray(images.normalize(np.stack([images.bundled(n, A.size) for n in names])))
  model = models.ResNet(stage_sizes=(1,)) if A.net == "tiny" else models.resnet18()
  v = model.init(jax.random.key(0), x[:1])
  y = features(model, v, x, "layer1")["layer1"]
  lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x.shape[1:]) for b in images.pixel_box())
  net = Net(blocks.stem_block(model, v), tuple(blocks.stage_blocks(model, v, 0).blocks()), lo, hi)
  B = pixel_scale("imagenet")
  n = len(names)
  scale = jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3)))
  weight = jnp.full((n,), np.sqrt(A.lam / (A.size * A.size)) * TV_RATIO / B, jnp.float32)
  cand = jnp.broadcast_to(in_map(y.shape[1:]), (n, WINDOW, *y.shape[1:]))
  zs = lambda t: jax.vmap(lambda u: stem_z(u, net))(t)
  picks = lambda t: jax.vmap(pick)(zs(t), cand)
  true_a = picks(x)  # diagnostics only
  pos = features(model, v, x, "maxpool")["maxpool"] > 0
  agree = lambda a: np.asarray(jnp.sum(pos & (a == true_a), (1, 2, 3)) / jnp.sum(pos, (1, 2, 3)))
  psnr = lambda t: np.asarray(metrics.image_metrics(images.denormalize(t), images.denormalize(x))["psnr"])
  tv = lambda t: np.asarray(objective_terms(model, v, y, "layer1", t)["tv"])
  obs = lambda t: np.asarray(jnp.sqrt(jnp.sum((features(model, v, t, "layer1")["layer1"] - y) ** 2, (1, 2, 3)))
                             / scale)

  t0 = time.perf_counter()
  xs, _ = mahendran_vedaldi(model, v, y, "layer1", key=jax.random.key(1), steps=A.mv_steps)
  if A.start == "natural":
    xs, _, _ = natural_preimage(model, v, "layer1", y, xs, box=(lo, hi), lambda_tv=A.lam, pixel_scale=B,
                                config=SolverConfig(rho=0.1, cg_iters=30, tol=1e-5), iters=A.natural_iters)
  a = true_a if A.oracle else picks(xs)
  if A.oracle_mix is not None:
    a_s, wz = picks(xs), jax.vmap(windows, in_axes=(0, None))(zs(x), -jnp.inf)
    at = lambda c: jnp.take_along_axis(wz, c[:, None], axis=1)[:, 0]
    near = at(true_a) - at(a_s) <= A.oracle_mix * jnp.abs(at(true_a))
    a = jnp.where(near, a_s, true_a)
    print(f"oracle mix: the start's choice kept on {agree(a_s)} (agreeing) + "
          f"{np.asarray(jnp.sum(pos & near & (a_s != true_a), (1, 2, 3)) / jnp.sum(pos, (1, 2, 3)))} (near-ties)")
  print(f"start {A.start}: residual {obs(xs)}, PSNR {psnr(xs)}, TV {tv(xs)} (true {tv(x)}), choice agrees with the "
        f"truth's (diagnostic) on {agree(picks(xs))} of windows > 0, {time.perf_counter() - t0:.0f} s", flush=True)
  g = jax.vmap(gap)(zs(xs), cand) / jnp.max(y, axis=(1, 2, 3), keepdims=True)
  right = picks(xs) == true_a
  for i in range(n):  # diagnostic: how often the start's choice is the truth's, by its confidence (gap quantile)
    gi, ri = np.asarray(g[i][pos[i]]), np.asarray(right[i][pos[i]])
    qs = np.quantile(gi, [0, 0.25, 0.5, 0.75, 0.9, 1.0])
    print(f"image {i}: agreement by gap quartile (low to high) "
          f"{[round(float(ri[(gi >= a) & (gi <= b)].mean()), 3) for a, b in zip(qs[:-1], qs[1:])]}", flush=True)
  cfg = SolverConfig(tol=1e-5, cg_iters=A.cg, rho=A.rho, inner_iters=5)
  active = jnp.ones(y.shape, bool)
  if A.commit < 1 and not A.oracle:
    active = commit(g, jnp.zeros(y.shape, bool), A.commit)
  data = Data(y, cand, a, active, scale, weight)
  st = engine.batch_init(PROBLEM, engine.LM, cfg, xs, data, net)
  st = st._replace(budget=jnp.zeros_like(st.k))
  best_res, best_x = obs(xs), xs
  t0 = time.perf_counter()
  for r in range(A.rounds):
    if A.reset:
      st = engine.batch_init(PROBLEM, engine.LM, cfg, st.u, data, net)._replace(budget=st.budget)
    st = engine.run(PROBLEM, engine.LM, cfg, data, net, st._replace(budget=st.budget + A.iters))
    res = obs(st.u)
    better = res < best_res
    best_res = np.minimum(res, best_res)
    best_x = jnp.where(jnp.asarray(better)[:, None, None, None], st.u, best_x)
    moved = np.zeros(n, int)
    if A.rule == "argmax":
      a_new = picks(st.u)
      moved = np.asarray(jnp.sum(a_new != data.a, (1, 2, 3)))
      data = data._replace(a=a_new)
    elif A.rule == "commit":
      zg = jax.vmap(gap)(zs(st.u), cand)
      a_new = jnp.where(data.active, data.a, picks(st.u))
      data = data._replace(a=a_new, active=commit(zg, data.active, A.commit))
      moved = np.asarray(jnp.sum(data.active, (1, 2, 3)))
    elif A.rule == "mult":
      a_new, go, st = mult_move(st, data, A.thresh)
      moved = np.asarray(jnp.sum(go, (1, 2, 3)))
      data = data._replace(a=a_new)
    print(f"round {r}: residual {res} PSNR {psnr(st.u)} TV {tv(st.u)} agree {agree(data.a)} moved {moved} "
          f"iters {np.asarray(st.k)} {time.perf_counter() - t0:.0f} s", flush=True)
    if np.all(res <= 1e-4):
      break
  print(f"best: residual {best_res}, PSNR {psnr(best_x)}, TV {tv(best_x)}")


if __name__ == "__main__":
  main()
