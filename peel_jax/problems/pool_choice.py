"""The smoothest exact preimage of the stem's max-pool output, by choosing each window's maximum (issue 10).

With ``z = A0 x`` the stem's convolution and folded BatchNorm (affine in the pixels), ``r = relu(z)`` ``(H, W, C)``
and ``m = maxpool(r)`` ``(Ho, Wo, C)`` (3x3 windows, stride 2, padding 1 with ``-inf``), ``m = maxpool(r)`` holds
iff

* (a) ``r_p <= m_w`` for every window ``w`` and position ``p`` in ``w``: ``z_p <= U_p = min_{w ∋ p} m_w``
  (:func:`peel_jax.problems.stem.pool_upper_bound`; ``relu(z) <= U`` iff ``z <= U`` since ``U >= 0``), and
* (b) every window with ``m_w > 0`` attains it: ``z_{a(w)} = m_w`` for some position ``a(w)`` of ``w``.

Given the choice ``a``, (a) and (b) are linear in ``x``, so per image

    min_x  (lambda_tv / 2) R_tv(x)   s.t.  z_{a(w)} = m_w  (m_w > 0),   z <= U,   lo <= x <= hi

is a convex quadratic program (``R_tv`` as :mod:`peel_jax.problems.preimage`). The true image is feasible for the
true choice, so that program's optimum has a prior no larger than the true image's. A gradient through ``maxpool``
reaches only each window's current argmax, which is why Gauss-Newton on ``maxpool(relu(z)) = m`` stalls at 1.5-4%
observation residual (``benchmarks/RESULTS.md``). Here the choice is a discrete variable, updated between solves.

The choice is narrowed by the observation alone. The true argmax of ``w`` lies in ``C(w) = {p in w : U_p = m_w}``.
Where ``m_w`` equals exactly the value of an overlapping window, the shared maximum sits in their overlap: two
different pre-pool values being equal floats is a coincidence. The exception is identical receptive fields (flat
or saturated patches). There the narrowing can drop the true argmax, unless the flat region also covers the
overlap; the merit, the true observation residual, then shows the failure. So the candidates are the members of
``C(w)`` shared with the most exactly-tied neighbours (:func:`candidates`). Measured on the tiny test network,
astronaut and coffee at 96 px: 4.2 -> 2.8 candidates per window, about a third of the windows left with one, and the true argmax kept
in every window.

The rounds, each ``round_iters`` iterations of the engine's augmented Lagrangian with Levenberg-Marquardt
(:mod:`peel_jax.solver.engine`; multipliers, penalty and LM damping carried from round to round):

1. Only windows with a single candidate carry the equality at first. After round ``r``, the undecided windows
   with the largest gap between their best and second-best candidate of the current ``z`` are enforced too (most
   confident first), until a share ``(r + 1) / commit_rounds`` is. An undecided window takes the current argmax
   over its candidates.
2. An enforced window moves its choice by an active-set rule. Its net multiplier is the equality's plus the chosen
   position's inequality multiplier. Where that is negative (the prior pulls the chosen value below ``m_w``: the
   attain constraint binds) and another candidate presses on its bound ``z_q <= m_w`` (inequality multiplier
   ``> 0``), the choice moves to the candidate pressing hardest and the window's equality multiplier restarts at 0.
   This is a first-order descent move; the pressing candidate already sits at ``m_w``.
3. From round ``freeze_round`` on, the choice is fixed and the last rounds solve one convex problem.

The merit (best iterate, convergence) is the observation residual ``||maxpool(relu(z)) - m|| / ||m||``. Measured
results: ``benchmarks/RESULTS.md``, section "Choosing the window maxima (issue 10)".
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

from peel_jax.blocks import Block, pool
from peel_jax.problems.preimage import tv_vector
from peel_jax.problems.stem import pool_upper_bound
from peel_jax.solver import engine
from peel_jax.solver.config import SolverConfig

WINDOW = 9  # positions of a 3x3 window


def windows(r: jax.Array, fill) -> jax.Array:
  """The 3x3 stride-2 pad-1 windows of one map ``r`` ``(H, W, C)``: ``(9, Ho, Wo, C)``, row-major offsets.

  Entry ``[3 i + j, a, b]`` is ``r[2 a - 1 + i, 2 b - 1 + j]``, or ``fill`` where that is padding.
  """
  ho, wo = (r.shape[0] - 1) // 2 + 1, (r.shape[1] - 1) // 2 + 1
  rp = jnp.pad(r, ((1, 1), (1, 1), (0, 0)), constant_values=fill)
  return jnp.stack([rp[i:i + 2 * ho - 1:2, j:j + 2 * wo - 1:2] for i in range(3) for j in range(3)])


def tie_count(m: jax.Array) -> jax.Array:
  """``(9, Ho, Wo, C)`` int: per window ``w`` of one pooled map ``m`` and position ``q`` of ``w``, how many other
  windows that also contain that position have exactly the value ``m_w``."""
  ho, wo = m.shape[0], m.shape[1]
  mp = jnp.pad(m, ((1, 1), (1, 1), (0, 0)), constant_values=jnp.nan)  # nan equals nothing
  out = []
  for i in range(3):
    for j in range(3):
      count = jnp.zeros(m.shape, jnp.int32)
      for u in (0,) + ((-1,) if i == 0 else ()) + ((1,) if i == 2 else ()):
        for v in (0,) + ((-1,) if j == 0 else ()) + ((1,) if j == 2 else ()):
          if u or v:
            count = count + (mp[1 + u:1 + u + ho, 1 + v:1 + v + wo] == m).astype(jnp.int32)
      out.append(count)
  return jnp.stack(out)


def candidates(m: jax.Array, ub: jax.Array) -> jax.Array:
  """``(9, Ho, Wo, C)`` bool: the positions of each window that may hold its maximum (see the module docstring).

  Args:
    m: one image's pooled map ``(Ho, Wo, C)``.
    ub: its bound ``U`` ``(H, W, C)`` (:func:`peel_jax.problems.stem.pool_upper_bound`).
  """
  c = windows(ub, -jnp.inf) >= m[None]
  score = jnp.where(c, tie_count(m), -1)
  return c & (score == jnp.max(score, axis=0, keepdims=True))


def pick(z: jax.Array, cand: jax.Array) -> jax.Array:
  """``(Ho, Wo, C)`` int32: each window's candidate of largest ``z`` (one image)."""
  return jnp.argmax(jnp.where(cand, windows(z, -jnp.inf), -jnp.inf), axis=0).astype(jnp.int32)


def gap(z: jax.Array, cand: jax.Array) -> jax.Array:
  """``(Ho, Wo, C)``: best minus second-best candidate value of ``z`` per window (``inf`` for one candidate)."""
  top = jax.lax.top_k(jnp.moveaxis(jnp.where(cand, windows(z, -jnp.inf), -jnp.inf), 0, -1), 2)[0]
  return jnp.where(jnp.isfinite(top[..., 1]), top[..., 0] - top[..., 1], jnp.inf)


@flax.struct.dataclass
class ChoiceNet:
  """The folded stem (``pool='max'``) and the pixel box of one image (shared by every image)."""

  stem: Block
  lo: jax.Array
  hi: jax.Array


class ChoiceData(NamedTuple):
  y: jax.Array  # the pooled observation m (Ho, Wo, C)
  ub: jax.Array  # U (H, W, C)
  cand: jax.Array  # (9, Ho, Wo, C) bool
  a: jax.Array  # (Ho, Wo, C) int32: the chosen offset per window
  active: jax.Array  # (Ho, Wo, C) bool: windows whose maximum is enforced
  scale: jax.Array  # ||m||
  weight: jax.Array  # the prior's weight sqrt(lambda_tv / (H W)) / V of this image, as problems.preimage


def pre_pool(x, net: ChoiceNet):
  """``z = A0 x`` for one image ``(H0, W0, 3)``: the stem before its ReLU and pool."""
  return net.stem.affine(0, x[None])[0]


def chosen(z: jax.Array, a: jax.Array) -> jax.Array:
  """``z`` at each window's chosen offset ``a`` ``(Ho, Wo, C)`` (one image; a padding offset reads the nearest
  row/column, and is never a candidate). A flat gather: measured 1.4x faster per LM iteration here than gathering
  from the stacked windows."""
  h, w, c = z.shape
  i = jnp.clip(2 * jnp.arange(a.shape[0])[:, None, None] - 1 + a // 3, 0, h - 1)
  j = jnp.clip(2 * jnp.arange(a.shape[1])[None, :, None] - 1 + a % 3, 0, w - 1)
  return z.ravel()[(i * w + j) * c + jnp.arange(c)[None, None, :]]


def _terms(x, d: ChoiceData, net: ChoiceNet):
  z = pre_pool(x, net)
  za = chosen(z, d.a)
  return (), jnp.where((d.y > 0) & d.active, za - d.y, 0.0) / d.scale, (z - d.ub) / d.scale


def _objective(x, d: ChoiceData, net: ChoiceNet):
  return tv_vector(x, d.weight)


def _bounds(x, d, net: ChoiceNet):
  return net.lo, net.hi


def _no_residual(x, d, net):
  return ()


def _merit(x, d: ChoiceData, net: ChoiceNet):
  out = pool(jax.nn.relu(pre_pool(x, net))[None], "max")[0]
  return jnp.sqrt(jnp.sum((out - d.y) ** 2)) / d.scale


POOL_CHOICE = engine.Problem(residual=_no_residual, bounds=_bounds, merit=_merit, objective=_objective, terms=_terms)


def start_data(y: jax.Array, size, weight: jax.Array) -> ChoiceData:
  """The data of every image before the first round: ``U``, the candidates, ``||m||``, and only windows with one
  candidate enforced (``a`` is set by the first :func:`rechoose`). ``y`` ``(N, Ho, Wo, C)``; ``size``: ``(H, W)``
  of the pre-pool map; ``weight``: ``(N,)`` the prior's weight per image."""
  ub = jax.vmap(lambda m: pool_upper_bound(m, size, "max"))(y)
  cand = jax.vmap(candidates)(y, ub)
  a = jax.vmap(lambda c: jnp.argmax(c, axis=0).astype(jnp.int32))(cand)
  scale = jnp.maximum(jnp.sqrt(jnp.sum(y * y, axis=(1, 2, 3))), 1e-30)
  return ChoiceData(y, ub, cand, a, (jnp.sum(cand, axis=1) == 1) & (y > 0), scale, weight)


def _move(lam, mu, d: ChoiceData):
  """Step 2 of the module docstring for one image: ``(a, lam)`` after the active-set moves."""
  wmu = windows(mu, 0.0)
  net_mult = lam + jnp.take_along_axis(wmu, d.a[None], axis=0)[0]
  other = d.cand & (jnp.arange(WINDOW)[:, None, None, None] != d.a[None])
  press = jnp.where(other, wmu, -jnp.inf)
  move = d.active & (d.y > 0) & (net_mult < 0) & (jnp.max(press, axis=0) > 0)
  return jnp.where(move, jnp.argmax(press, axis=0).astype(jnp.int32), d.a), jnp.where(move, 0.0, lam)


def _commit(z, d: ChoiceData, undecided0, share):
  """Step 1 for one image: ``(a, active)``; ``share`` of the initially undecided windows enforced afterwards."""
  a = jnp.where(d.active, d.a, pick(z, d.cand))
  g = jnp.where(d.active | (d.y <= 0), -jnp.inf, gap(z, d.cand)).ravel()
  left = jnp.sum(g > -jnp.inf)
  k = jnp.clip(jnp.ceil(share * undecided0).astype(jnp.int32) - (undecided0 - left), 0, g.size)
  thr = jnp.sort(g)[::-1][jnp.maximum(k - 1, 0)]
  return a, d.active | ((k > 0) & (g >= thr) & (g > -jnp.inf)).reshape(d.y.shape)


@jax.jit
def rechoose(st: engine.State, d: ChoiceData, net: ChoiceNet, undecided0, share):
  """One round's update for every image: ``(data, lam)`` with the new choice, enforced set and multipliers."""

  def one(x, lam, mu, d1, n0):
    a, lam = _move(lam, mu, d1)
    a, active = _commit(pre_pool(x, net), d1._replace(a=a), n0, share)
    return a, active, lam

  a, active, lam = jax.vmap(one)(st.u, st.lam, st.mu, d, undecided0)
  return d._replace(a=a, active=active), lam


_init = jax.jit(engine.batch_init, static_argnames=("problem", "method", "config"))


@dataclasses.dataclass(frozen=True)
class ChoiceSchedule:
  """When the choice changes (see the module docstring). Defaults measured on the tiny test network
  (``benchmarks/RESULTS.md``). There, 6-10 iterations per round, 5-10 commit rounds, and freezing 4-6 rounds after
  the last commit all reached residual <= 6e-5 within 137-200 iterations.

  Attributes:
    round_iters: engine iterations per round (between choice updates).
    commit_rounds: every window is enforced after this many rounds (fewer when the budget ends sooner).
    freeze_round: from this round on the choice is fixed.
  """

  round_iters: int = 10
  commit_rounds: int = 8
  freeze_round: int = 12

  def validate(self) -> "ChoiceSchedule":
    for field in ("round_iters", "commit_rounds", "freeze_round"):
      if getattr(self, field) < 1:
        raise ValueError(f"ChoiceSchedule.{field} must be >= 1, got {getattr(self, field)}")
    return self


def applies(model, layer: str) -> bool:
  """Whether :func:`choose_maxima` solves ``layer``: the max-pooled ReLU stem observed at its output."""
  return layer == "maxpool" and model.stem_pool == "max" and not model.small_stem and model.activation == "relu"


def choose_maxima(stem: Block, y, x0, lo, hi, weight, config: SolverConfig, *, iters: int,
                  schedule: ChoiceSchedule = ChoiceSchedule()):
  """Solves the module docstring's problem per image from ``x0``, in rounds.

  Args:
    stem: the folded stem (:func:`peel_jax.blocks.stem_block`) with ``pool='max'`` and a ReLU.
    y: ``(N, Ho, Wo, C)`` the stem's pooled output; ``x0``: ``(N, H0, W0, 3)`` the starts (inside the box).
    lo, hi: the pixel box of one image ``(H0, W0, 3)``; ``weight``: ``(N,)`` the prior's weight per image (as
      problems.preimage).
    config: the engine's options (``rho``, ``cg_iters``, ``inner_iters``, ``tol``, ``damping``, ``driver``).
    iters: iteration budget per image (``ceil(iters / schedule.round_iters)`` rounds).
    schedule: when the choice changes.

  Returns:
    ``(x, iterations, observation_residual)``: the best iterate by observation residual ``(N, H0, W0, 3)``, the
    iterations and the residual per image ``(N,)``.
  """
  schedule = schedule.validate()
  rounds = -(-int(iters) // schedule.round_iters)
  commit_rounds = max(1, min(schedule.commit_rounds, rounds - 1))
  z = jax.eval_shape(lambda t: stem.affine(0, t), x0).shape
  net = ChoiceNet(stem, lo, hi)
  d = start_data(y, (z[1], z[2]), weight)
  undecided0 = jnp.sum(~d.active & (y > 0), axis=(1, 2, 3))
  st = _init(POOL_CHOICE, engine.LM, config, x0, d, net)
  st = st._replace(budget=jnp.zeros_like(st.k))
  for r in range(rounds):
    if r < schedule.freeze_round:
      d, lam = rechoose(st, d, net, undecided0, jnp.asarray(min(1.0, r / commit_rounds), jnp.float32))
      st = st._replace(lam=lam)
    budget = jnp.minimum(st.budget + schedule.round_iters, int(iters))
    st = engine.run(POOL_CHOICE, engine.LM, config, d, net, st._replace(budget=budget))
  return st.best_u, st.k, st.best_merit
