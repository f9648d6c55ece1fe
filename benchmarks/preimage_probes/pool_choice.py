"""Probe (issue 10): min TV(x) s.t. the observation, with the max-pool's window maxima CHOSEN (one position per window).

Observed at `maxpool`: with a choice a(w) the constraints are linear in x:
  z_{a(w)} = m_w where m_w > 0,   z_p <= U_p = min_{w ∋ p} m_w,   lo <= x <= hi   (z = bn(conv(x)), affine)
so the solve is a convex QP per choice. Candidates: C(w) = {p in w : U_p = m_w} holds the true argmax.
Observed at `layer1`: the block's input h = relu(z_a) (the chosen positions), split z1 = y / z1 <= 0, and
z_{p(w,q)} <= relu(z_{a(w)}) for every position q of window w.
Rounds: solve with the choice fixed, then re-choose a(w) = argmax over C(w) of the current z (a DCA step).

  python benchmarks/preimage_probes/pool_choice.py LAYER ROUNDS ITERS LAMBDA_TV START [RULE] [SIZE]
  LAYER maxpool|layer1; START mv|grey; RULE fixed (re-choose between rounds) | dynamic (argmax every LM step)
"""
import sys, time
import numpy as np
import jax, jax.numpy as jnp
from typing import Any, NamedTuple
import flax

jax.config.update("jax_numpy_rank_promotion", "raise")
from peel_jax import models, images, blocks, metrics
from peel_jax._features import features
from peel_jax.problems.stem import pool_upper_bound
from peel_jax.problems.preimage import tv_vector, TV_RATIO
from peel_jax.solver import engine
from peel_jax.solver.config import SolverConfig
from peel_jax.baselines.mahendran_vedaldi import mahendran_vedaldi, pixel_scale, objective_terms

import argparse
ap = argparse.ArgumentParser()
ap.add_argument("layer", nargs="?", default="maxpool")
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--iters", type=int, default=20)
ap.add_argument("--lams", default="1e-3", help="lambda_tv per round (the last repeats)")
ap.add_argument("--start", default="mv", choices=["mv", "grey"])
ap.add_argument("--mv-steps", type=int, default=200)
ap.add_argument("--rule", default="argmax", choices=["argmax", "dynamic", "mult"],
                help="re-choice between rounds: argmax of z over the candidates (DCA), every LM step, or by multiplier sign")
ap.add_argument("--commit", type=float, default=0.0,
                help="> 0: enforce first the one-candidate windows, then this fraction of the rest per round (by gap)")
ap.add_argument("--size", type=int, default=96)
ap.add_argument("--rho", type=float, default=10.0)
ap.add_argument("--cg", type=int, default=30)
ap.add_argument("--inner", type=int, default=5)
ap.add_argument("--no-ties", action="store_true")
ap.add_argument("--kick", type=float, default=0.0, help="mult rule: fraction of windows moved non-locally per round")
ap.add_argument("--freeze", type=int, default=0, help="no re-choice from this round on (0: never frozen)")
ap.add_argument("--commit-rounds", type=int, default=0, help="commit linearly: all undecided windows by this round")
ap.add_argument("--reset", action="store_true", help="fresh multipliers every round")
ap.add_argument("--net", default="tiny", choices=["tiny", "resnet18"])
ap.add_argument("--images", default="astronaut,coffee")
ap.add_argument("--library", action="store_true",
                help="run peel_jax.problems.preimage.natural_preimage (the library) and M-V at the same wall time")
ap.add_argument("--lib-iters", type=int, default=200)
ap.add_argument("--tol", type=float, default=5e-5)
ap.add_argument("--schedule", default="10,8,12", help="library mode: round_iters,commit_rounds,freeze_round")
ap.add_argument("--mv-lams", default="1e-3,1e-2", help="library mode: M-V lambda_tv values of the equal-time baseline")
ap.add_argument("--oracle", action="store_true", help="diagnostic only: solve with the true choice")
A = ap.parse_args()
layer, rounds, iters, start, rule, size, rho, cg = A.layer, A.rounds, A.iters, A.start, A.rule, A.size, A.rho, A.cg
lams = [float(t) for t in A.lams.split(",")]
lam_tv = lams[-1]

def windows(r, fill):
  """(9, Ho, Wo, C): the 3x3 stride-2 pad-1 windows of r (H, W, C), padding = fill."""
  ho, wo = (r.shape[0] - 1) // 2 + 1, (r.shape[1] - 1) // 2 + 1
  rp = jnp.pad(r, ((1, 1), (1, 1), (0, 0)), constant_values=fill)
  return jnp.stack([rp[i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)])


def chosen(z, a):
  return jnp.take_along_axis(windows(z, 0.0), a[None], axis=0)[0]


def tie_count(m):
  """(9, Ho, Wo, C): per window w and position q of w, how many OTHER windows containing that position share the
  value m_w exactly (an exact tie between overlapping windows: the shared maximum sits in their overlap)."""
  ho, wo = m.shape[0], m.shape[1]
  mp = jnp.pad(m, ((1, 1), (1, 1), (0, 0)), constant_values=jnp.nan)
  out = []
  for i in range(3):
    for j in range(3):
      s = jnp.zeros(m.shape, jnp.int32)
      for u in [0] + ([-1] if i == 0 else []) + ([1] if i == 2 else []):
        for v in [0] + ([-1] if j == 0 else []) + ([1] if j == 2 else []):
          if u or v:
            s = s + (mp[1 + u:1 + u + ho, 1 + v:1 + v + wo] == m).astype(jnp.int32)
      out.append(s)
  return jnp.stack(out)


def candidates(m, ub, ties=True):
  c = windows(ub, -jnp.inf) >= m[None]
  if not ties:
    return c
  score = jnp.where(c, tie_count(m), -1)
  return c & (score == jnp.max(score, axis=0, keepdims=True))


@flax.struct.dataclass
class Shared:
  stem: Any
  block: Any
  lo: jax.Array
  hi: jax.Array
  weight: jax.Array
  dynamic: bool = flax.struct.field(pytree_node=False, default=False)


class Data(NamedTuple):
  y: jax.Array  # observation
  ub: jax.Array  # U (maxpool) or zeros
  cand: jax.Array  # (9, Ho, Wo, C) bool
  a: jax.Array  # (Ho, Wo, C) int32
  active: jax.Array  # (Ho, Wo, C) bool: windows whose maximum is enforced (an equality at the chosen position)
  scale: jax.Array


def z_of(x, sh):
  return sh.stem.affine(0, x[None])[0]


def choice(z, d, sh):
  if sh.dynamic:
    return jnp.argmax(jnp.where(d.cand, windows(z, -jnp.inf), -jnp.inf), axis=0)
  return d.a


def terms(x, d: Data, sh: Shared):
  z = z_of(x, sh)
  za = chosen(z, jax.lax.stop_gradient(choice(z, d, sh)))
  if sh.block is None:  # maxpool
    return (), jnp.where((d.y > 0) & d.active, za - d.y, 0.0) / d.scale, (z - d.ub) / d.scale
  h = jax.nn.relu(za)
  z1 = sh.block.pre_activation(h[None])[0]
  eq = jnp.where(d.y > 0, z1 - d.y, 0.0) / d.scale
  g1 = jnp.where(d.y > 0, 0.0, z1) / d.scale
  gw = windows(z, -1e30) - h[None]
  hs = jnp.sqrt(jnp.sum(h * h))
  return (), eq, (g1, jnp.where(gw > -1e29, gw, 0.0) / jnp.maximum(hs, 1e-30))


def objective(x, d, sh):
  return tv_vector(x, sh.weight)


def bounds(x, d, sh):
  return sh.lo, sh.hi


def forward(x, sh):
  h = blocks.pool(jax.nn.relu(z_of(x, sh))[None], "max")
  return h[0] if sh.block is None else sh.block(h)[0]


def merit(x, d, sh):
  return jnp.sqrt(jnp.sum((forward(x, sh) - d.y) ** 2)) / d.scale


PROBLEM = engine.Problem(residual=None, bounds=bounds, merit=merit, objective=objective, terms=terms)

img = np.stack([images.bundled(name, size) for name in A.images.split(",")])
x_true = jnp.asarray(images.normalize(img))
model = models.ResNet(stage_sizes=(1,)) if A.net == "tiny" else models.resnet18()
if A.net != "tiny" and layer != "maxpool" and not A.library:
  raise SystemExit("the probe's own layer1 formulation is the tiny net's (one block); use --library")
v = model.init(jax.random.key(0), x_true[:1])
y = features(model, v, x_true, layer)[layer]
stem = blocks.stem_block(model, v)
blk = None if layer == "maxpool" else blocks.residual_block(model, v, 0, 0)
lo, hi = (jnp.broadcast_to(jnp.asarray(b, jnp.float32), x_true.shape[1:]) for b in images.pixel_box())
B = pixel_scale("imagenet")
tv_weight = lambda lam: jnp.float32((lam / (size * size)) ** 0.5 * TV_RATIO / B)
weight = tv_weight(lam_tv)
sh = Shared(stem, blk, lo, hi, weight, rule == "dynamic")
n = x_true.shape[0]
hp = (size // 2, size // 2)
if layer == "maxpool":
  ub = jax.vmap(lambda m: pool_upper_bound(m, hp, "max"))(y)
  cand = jax.vmap(lambda u, m: candidates(m, u, not A.no_ties))(ub, y)
else:
  ub = jnp.zeros((n, *hp, y.shape[-1]))
  cand = jnp.ones((n, 9, *y.shape[1:]), bool)
  cand = cand.at[:, :, 0].set(cand[:, :, 0] & (jnp.arange(9) // 3 > 0)[None, :, None, None])
  cand = cand.at[:, :, :, 0].set(cand[:, :, :, 0] & (jnp.arange(9) % 3 > 0)[None, :, None, None])
scale = jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3)))
zt = jax.vmap(lambda t: z_of(t, sh))(x_true)
true_a = jax.vmap(lambda z, c: jnp.argmax(jnp.where(c, windows(z, -jnp.inf), -jnp.inf), axis=0))(zt, cand)
pos = (blocks.pool(jax.nn.relu(zt), "max") > 0)
ncand = jnp.sum(cand, axis=1)
print(f"{layer}: pixels {x_true[0].size}, windows>0 {np.asarray(jnp.sum(pos, (1, 2, 3)))}, "
      f"one-candidate windows>0 {np.asarray(jnp.sum(pos & (ncand == 1), (1, 2, 3)))}, "
      f"mean candidates {np.asarray(jnp.sum(jnp.where(pos, ncand, 0), (1, 2, 3)) / jnp.sum(pos, (1, 2, 3)))}", flush=True)

t0 = time.perf_counter()
if start == "mv":
  x0, _ = mahendran_vedaldi(model, v, y, layer, key=jax.random.key(1), steps=A.mv_steps)
else:
  x0 = jnp.broadcast_to((lo + hi)[None] / 2, x_true.shape) + 0.05 * jax.random.normal(jax.random.key(3), x_true.shape)
x0 = jnp.clip(x0, lo[None], hi[None])
t_start = time.perf_counter() - t0
tv = lambda t: np.asarray(objective_terms(model, v, y, layer, t)["tv"])
psnr = lambda t: np.asarray(metrics.image_metrics(images.denormalize(t), images.denormalize(x_true))["psnr"])
obs = lambda t: np.asarray(jnp.linalg.norm((features(model, v, t, layer)[layer] - y).reshape(n, -1), axis=1) / scale)
print(f"start {start} ({t_start:.1f}s): residual {obs(x0)} psnr {psnr(x0)} tv {tv(x0)}; true tv {tv(x_true)}",
      flush=True)

if A.library:  # the library's solve, then Mahendran-Vedaldi given the same wall time (start included)
  from peel_jax.problems.pool_choice import ChoiceSchedule
  from peel_jax.problems.preimage import natural_preimage

  def report(label, t, secs, extra=""):
    print(f"{label}: residual {obs(t)} psnr {psnr(t)} tv {tv(t)} (true {tv(x_true)}) {secs:.1f}s {extra}", flush=True)

  t1 = time.perf_counter()
  xh, k, res = natural_preimage(model, v, layer, y, x0, box=(lo, hi), lambda_tv=lam_tv, pixel_scale=B,
                                config=SolverConfig(tol=A.tol, cg_iters=cg, rho=rho), iters=A.lib_iters,
                                choice=ChoiceSchedule(*(int(t) for t in A.schedule.split(","))))
  res.block_until_ready()
  t_ours = t_start + time.perf_counter() - t1
  report("ours (start included)", xh, t_ours, f"iters {np.asarray(k)}")
  if not A.mv_lams:
    raise SystemExit(0)
  t1 = time.perf_counter()
  mahendran_vedaldi(model, v, y, layer, key=jax.random.key(1), steps=50)[0].block_until_ready()
  per_step = (time.perf_counter() - t1) / 50
  steps = max(1, int(t_ours / per_step))
  for lam in [float(t) for t in A.mv_lams.split(",") if t]:
    t1 = time.perf_counter()
    xm, _ = mahendran_vedaldi(model, v, y, layer, key=jax.random.key(1), steps=steps, lambda_tv=lam)
    xm.block_until_ready()
    report(f"M-V lambda_tv {lam:g}, {steps} steps", xm, time.perf_counter() - t1)
  raise SystemExit(0)


def pick(x):
  z = jax.vmap(lambda t: z_of(t, sh))(x)
  return jax.vmap(lambda zz, c: jnp.argmax(jnp.where(c, windows(zz, -jnp.inf), -jnp.inf), axis=0))(z, cand)


inner = A.inner
cfg = SolverConfig(tol=1e-5, cg_iters=cg, rho=rho, inner_iters=inner)
x = x0
a = pick(x)
if A.commit > 0:  # windows with one candidate are decided by the observation alone
  active = jnp.sum(cand, axis=1) == 1
  undecided0 = np.asarray(jnp.sum(~active & (y > 0), (1, 2, 3)))
else:
  active = jnp.ones_like(y, bool)


def switch(st, x, a, cand):
  """Active-set move: where the window's attain constraint binds (net multiplier of the chosen position < 0), move
  the choice to the candidate pressing hardest against its bound (largest inequality multiplier > 0)."""
  wmu = jax.vmap(windows, in_axes=(0, None))(st.mu, 0.0)
  net = st.lam + jnp.take_along_axis(wmu, a[:, None], 1)[:, 0]
  other = cand & (jnp.arange(9)[None, :, None, None, None] != a[:, None])
  score = jnp.where(other, wmu, -jnp.inf)
  q = jnp.argmax(score, axis=1)
  go = (net < 0) & (jnp.max(score, axis=1) > 0) & (y > 0)
  if A.kick > 0:  # non-local: the most strongly binding windows with no candidate pressing move to the next-highest z
    z = jax.vmap(lambda t: z_of(t, sh))(x)
    wz = jax.vmap(windows, in_axes=(0, None))(z, -jnp.inf)
    q2 = jnp.argmax(jnp.where(other, wz, -jnp.inf), axis=1)
    stuck = (net < 0) & ~go & (y > 0) & jnp.any(other, axis=1)
    k = int(A.kick * float(jnp.sum(y[0] > 0)))
    thr = jax.vmap(lambda t: jnp.sort(t.ravel())[k])(jnp.where(stuck, net, jnp.inf))
    kick = stuck & (net <= thr[:, None, None, None])
    print(f"  switched {np.asarray(jnp.sum(go, (1, 2, 3)))} kicked {np.asarray(jnp.sum(kick, (1, 2, 3)))}")
    q, go = jnp.where(kick, q2, q), go | kick
  return jnp.where(go, q, a), jnp.where(go, 0.0, st.lam)


def gap(x):
  """Per window: best minus second-best candidate value of the current z (relative to max y): a confidence."""
  z = jax.vmap(lambda t: z_of(t, sh))(x)
  w = jax.vmap(windows, in_axes=(0, None))(z, -jnp.inf)
  srt = jnp.sort(jnp.where(cand, w, -jnp.inf), axis=1)
  return jnp.where(jnp.isfinite(srt[:, -2]), srt[:, -1] - srt[:, -2], jnp.inf)


t0 = time.perf_counter()
total = 0
oracle = A.oracle
for r in range(0 if oracle else rounds):
  agree = float(jnp.mean(jnp.where(pos, a == true_a, True)))
  sh = sh.replace(weight=tv_weight(lams[min(r, len(lams) - 1)]))
  data = Data(y, ub, cand, a, active, scale)
  if r == 0 or A.reset:
    st = engine.batch_init(PROBLEM, engine.LM, cfg, x, data, sh)
    st = st._replace(budget=jnp.zeros_like(st.k))
  st = engine.run(PROBLEM, engine.LM, cfg, data, sh, st._replace(budget=st.budget + iters))
  x = st.u
  total += iters
  a_new = pick(x)
  if A.freeze and r >= A.freeze:
    a_new = a
  elif rule == "mult":
    a_sw, lam_new = switch(st, x, a, cand)
    a_new = jnp.where(active, a_sw, a_new)
    st = st._replace(lam=lam_new)
  changed = int(jnp.sum(a_new != a))
  print(f"round {r}: residual {obs(x)} best {np.asarray(st.best_merit)} psnr {psnr(x)} tv {tv(x)} "
        f"agree-with-true(diagnostic) {agree:.4f} changed {changed} t {time.perf_counter() - t0:.1f}", flush=True)
  a = a_new
  if A.commit > 0:
    g = jnp.where(active | (y <= 0), -jnp.inf, gap(x))
    last = r >= rounds - 2
    for i in range(n):
      left = int(jnp.sum(jnp.isfinite(g[i])))
      k = left if last else int(np.ceil(A.commit * left))
      if A.commit_rounds:
        k = max(0, int(np.ceil(min(1.0, (r + 1) / A.commit_rounds) * undecided0[i])) - (undecided0[i] - left))
      if k:
        thr = jnp.sort(g[i].ravel())[-k]
        active = active.at[i].set(active[i] | (g[i] >= thr))
    wrong = jnp.sum(active & pos & (a != true_a), (1, 2, 3))
    print(f"  committed {np.asarray(jnp.sum(active & pos, (1, 2, 3)))} of {np.asarray(jnp.sum(pos, (1, 2, 3)))}, "
          f"wrong (diagnostic) {np.asarray(wrong)}", flush=True)
  if np.all(obs(x) <= 1e-4):
    break
print(f"final: residual {obs(x)} psnr {psnr(x)} tv {tv(x)} true tv {tv(x_true)} iters {total} "
      f"t {time.perf_counter() - t0:.1f}s (start {t_start:.1f}s)")
if oracle:  # diagnostic only: the true choice (never an attacker's)
  t0 = time.perf_counter()
  st = engine.solve(PROBLEM, cfg, x0, Data(y, ub, cand, true_a, jnp.ones_like(y, bool), scale), sh, method=engine.LM, budget=rounds * iters)
  print(f"oracle choice: residual {obs(st.u)} psnr {psnr(st.u)} tv {tv(st.u)} iters {np.asarray(st.k)} "
        f"t {time.perf_counter() - t0:.1f}")
