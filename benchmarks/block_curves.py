"""Error against wall time for the block solvers: ours, the authors' method (eager torch and our JAX port), fixed point.

    python -m benchmarks.block_curves [--quick] [--problems toy,c64/s16,c64/s56] [--gains 1.0,0.3]
        [--methods ours,fixed_point,authors_jax,authors_torch] [--out benchmarks/results/block_curves.json]
        [--png benchmarks/block_curves.png] [--overwrite]

Issue 13: time to accuracy, not time to a tolerance. ``benchmarks.block_solver`` times each method at one stopping
rule. Here each method runs at a ladder of budgets, every budget gives one point (seconds, relative input error,
relative residual), and the ``time_to_error`` table reads off the time each method needs to reach a given error, so
that every speed claim can name the error level it is made at.

Problems: image 0 of ``zoo.block_problem('paper', channels=C, size=S, n=8, branch_gain=g)``, the batch-1 rows of
``benchmarks.block_solver``: ``toy`` (5 channels, 8x8), ``c64/s16`` and ``c64/s56`` (64 channels, 16x16 and 56x56;
any ``cC/sS`` is accepted); ``branch_gain`` 1.0 (He scale) and 0.3 (contractive).

Methods (:data:`CURVE_METHODS`; a solver variant is one more entry, ``ours_variant({'cg_iters': 10})``):
  ours           ``peel_jax.invert_block`` with ``max_iters=b, tol=1e-12`` (so it spends all ``b`` iterations) for each
                 budget ``b``, plus one point at the default ``SolverConfig()``, its own ``tol`` and ``max_iters``
                 (``budget='default'``).
  fixed_point    ``peel_jax.baselines.fixed_point(block, y, iters=b, tol=1e-12)``; only blocks ``y = x + F(x)``.
  authors_jax    ``peel_jax.baselines.authors_penalty(block, y, key=key(0), steps=b)``, the library's default
                 ``'python'`` driver (the fair one on CPU; see ``benchmarks.block_solver``).
  authors_torch  the paper's eager PyTorch loop, :func:`benchmarks.authors_torch.authors_torch` (seed 0), under
                 ``torch.set_num_threads(1)`` (on this loaded 2-core machine the default thread count was tens of times
                 slower; see that module). One run of the largest budget: a global optimizer step hook records the
                 time and copies ``x`` at each checkpoint step, with the clock paused while it copies.

Timing: seconds per image (batch 1), steady state. Every point but torch's is one complete call with its budget. Ours
recompiles for each budget (``SolverConfig`` is a static ``jit`` argument), so each budget is first called once
untimed (compile + run); the baselines take their budget as a traced value, so one untimed call per problem, at the
first budget, suffices. Then the median of at most ``--repeats`` (25) calls, stopping once ``--min-time`` (0.5 s) is
timed. Torch: one untimed warm-up run (50 steps, seed 1), then whole runs repeated the same way, the median per
checkpoint. Compiles are cached in the process, so the second gain of a problem reuses the first's.

``--quick``: the toy, ladders of one to three budgets, at most 5 calls or 0.05 s per point, and the JAX port in chunks
of 2 steps instead of 10 (the same iterates; compiling 10 unrolled Adam steps took 10-16 s on 2 loaded cores).

Errors, for every method alike and outside the timed region: :func:`peel_jax.relative_error` ``||x_hat - x|| / ||x||``
and :func:`peel_jax.relative_residual` ``||block(x_hat) - y|| / ||y||`` (float32, the zoo's block) of the returned
``x_hat``. ``time_to_error``: for each level E in 1e-1, 1e-3, 1e-5, the least time among a method's measured points
with error at or below E (no interpolation), else "not reached" with the best error measured; and the speed ratio
``authors_torch``'s time at E over the method's. Where torch did not reach E its time for its whole budget is used,
and the ratio is a lower bound (``>=``). ``time_to_residual`` is the same for the residual.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import peel_jax
from benchmarks import block_solver
from peel_jax import zoo
from peel_jax.baselines import authors_penalty
from peel_jax.baselines.fixed_point import check_applicable as _fixed_point_applies
from peel_jax.baselines.fixed_point import fixed_point

PROBLEMS = {"toy": (5, 8), "c64/s16": (64, 16), "c64/s56": (64, 56)}
GAINS = (1.0, 0.3)
BATCH = 8  # the problem is block_problem(..., n=BATCH); image 0 is solved
LEVELS = (1e-1, 1e-3, 1e-5)
TINY_TOL = 1e-12  # budget points: a tolerance no float32 run reaches, so every budget is spent
REFERENCE = "authors_torch"  # the speed ratios are this method's time over each method's, at one error level
DEFAULT = "default"  # the budget label of a point at a solver's default config


@dataclasses.dataclass(frozen=True)
class Timing:
  repeats: int = 25  # most timed calls per point
  min_time: float = 0.5  # stop repeating once this many seconds are timed


QUICK_TIMING = Timing(repeats=5, min_time=0.05)


@dataclasses.dataclass(frozen=True)
class CurveProblem:
  """Image 0 of a zoo paper-block problem: ``x``, ``y`` are ``(1, H, W, C)``."""

  label: str
  channels: int
  size: int
  gain: float
  block: object
  x: jax.Array
  y: jax.Array


def curve_problem(label: str, gain: float) -> CurveProblem:
  """Image 0 of ``zoo.block_problem('paper', channels, size, n=8, branch_gain=gain)`` (as ``block_solver``)."""
  channels, size = parse_problem(label)
  prob = zoo.block_problem("paper", channels=channels, size=size, n=BATCH, branch_gain=gain)
  return CurveProblem(label, channels, size, gain, prob.block, prob.x[:1], prob.y[:1])


def parse_problem(label: str) -> tuple[int, int]:
  """``(channels, size)`` of ``'toy'``, ``'c64/s16'``, ... (any ``cC/sS``)."""
  if label in PROBLEMS:
    return PROBLEMS[label]
  m = re.fullmatch(r"c(\d+)/s(\d+)", label)
  if not m:
    raise ValueError(f"unknown problem {label!r}; expected one of {tuple(PROBLEMS)} or 'cC/sS' (e.g. c32/s24)")
  return int(m.group(1)), int(m.group(2))


# --- timing -----------------------------------------------------------------------------------------------------------


def _ready(out):
  jax.block_until_ready(out)
  return out


def steady(fn: Callable, timing: Timing, warm: bool) -> tuple:
  """``(output, first-call seconds or None, median seconds, calls timed)``; ``fn`` must block until done."""
  first = None
  if warm:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
  times: list[float] = []
  out = None
  while len(times) < max(1, timing.repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
    if sum(times) >= timing.min_time:
      break
  return out, first, float(np.median(times)), len(times)


# --- the methods ------------------------------------------------------------------------------------------------------

# A raw point, as a method's runner yields it: {'budget', 'seconds', 'x_hat' (1, H, W, C), 'timed_calls',
# 'first_call_s' (None when not warmed at this budget), 'iterations' and 'converged' (None when the method has no
# such report)}, plus anything method-specific. The driver adds the problem, the errors and the load.
Runner = Callable[[CurveProblem, tuple, Timing], Iterator[dict]]


@dataclasses.dataclass(frozen=True)
class CurveMethod:
  """One entry of :data:`CURVE_METHODS`: called as ``method(problem, budgets, timing)``, it yields raw points.

  Attributes:
    runner: ``(problem, budgets, timing) -> iterator of raw points`` (see :data:`Runner`).
    ladder: the budgets of a full run, increasing.
    quick_ladder: the budgets of ``--quick``.
    unit: what a budget counts.
    description: one line for the JSON's metadata.
    applies: ``block -> None``, raising ``ValueError`` where the method does not apply (the problem is skipped).
    config: the solver configuration, recorded in the metadata (ours and its variants).
    quick_runner: what ``--quick`` runs instead of ``runner`` (a setting that compiles faster), or ``None``.
  """

  runner: Runner
  ladder: tuple
  quick_ladder: tuple
  unit: str
  description: str
  applies: Callable | None = None
  config: dict | None = None
  quick_runner: Runner | None = None

  def __call__(self, problem: CurveProblem, budgets: tuple, timing: Timing, quick: bool = False) -> Iterator[dict]:
    return (self.quick_runner if quick and self.quick_runner is not None else self.runner)(problem, budgets, timing)


def budgeted(solve: Callable, *, warm_each: bool, default_point: bool = False) -> Runner:
  """A runner that times one complete call ``solve(block, y, budget) -> (x_hat, info)`` per budget.

  Args:
    solve: ``(block, y, budget) -> (x_hat, info)``; ``info`` an :class:`peel_jax.InversionInfo` or ``None``;
      ``budget=None`` means the method's default configuration (used when ``default_point``).
    warm_each: call every budget once untimed before timing it (the budget is a static argument and recompiles);
      otherwise only the first budget (the budget is traced).
    default_point: also one point at ``solve(block, y, None)``, its budget labelled ``'default'`` (warmed up).
  """

  def run(prob: CurveProblem, budgets: tuple, timing: Timing) -> Iterator[dict]:
    plan = [(b, warm_each or i == 0) for i, b in enumerate(budgets)] + ([(None, True)] if default_point else [])
    for budget, warm in plan:
      fn = lambda budget=budget: _ready(solve(prob.block, prob.y, budget))
      (x_hat, info), first, secs, calls = steady(fn, timing, warm)
      label = DEFAULT if budget is None else (float(budget) if isinstance(budget, float) else int(budget))
      yield {"budget": label, "seconds": secs, "x_hat": x_hat,
             "timed_calls": calls, "first_call_s": first,
             "iterations": None if info is None else int(np.asarray(info.iterations)[0]),
             "converged": None if info is None else bool(np.asarray(info.converged)[0])}

  return run


OURS_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24)
OURS_QUICK_LADDER = (2,)


def ours_variant(config_overrides: dict, *, ladder: tuple = OURS_LADDER, quick_ladder: tuple = OURS_QUICK_LADDER,
                 budget_fields: tuple = ("max_iters",), description: str | None = None) -> CurveMethod:
  """A :data:`CURVE_METHODS` entry for ``peel_jax.invert_block`` at ``SolverConfig()`` with ``config_overrides``.

  Budget ``b`` runs ``config`` with every field of ``budget_fields`` set to ``b`` and ``tol=TINY_TOL``; one more
  point runs ``config`` itself (its own ``tol`` and budgets), labelled ``'default'``.

  Args:
    config_overrides: ``SolverConfig`` fields to change from the library default (``{}``: the default itself).
    ladder, quick_ladder: the budgets of a full and a ``--quick`` run.
    budget_fields: the integer ``SolverConfig`` fields a budget sets. ``('max_iters',)`` caps the solver's own
      iterations; a solver with a stage that ``max_iters`` does not cap needs that stage's budget field here too, or
      its budget points will all spend that stage's default budget.
    description: for the metadata; default names the overrides.

  Raises:
    TypeError / ValueError: an unknown ``SolverConfig`` field or an invalid value, when the entry is built.
  """
  config = dataclasses.replace(peel_jax.SolverConfig(), **config_overrides).validate()
  for field in budget_fields:
    if not isinstance(getattr(config, field, None), int):
      raise TypeError(f"budget field {field!r} is not an integer field of SolverConfig")

  def solve(block, y, budget):
    cfg = config if budget is None else dataclasses.replace(
        config, tol=TINY_TOL, **{field: int(budget) for field in budget_fields})
    return peel_jax.invert_block(block, y, config=cfg)

  return CurveMethod(
      runner=budgeted(solve, warm_each=True, default_point=True), ladder=tuple(ladder),
      quick_ladder=tuple(quick_ladder), unit=f"solver iterations ({', '.join(budget_fields)}; tol={TINY_TOL:g})",
      description=description or f"peel_jax.invert_block, SolverConfig() with {config_overrides or 'no overrides'}",
      config={**dataclasses.asdict(config), "budget_fields": list(budget_fields)})


TOL_LADDER = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def ours_tolerances(config_overrides: dict, *, ladder: tuple = TOL_LADDER, quick_ladder: tuple = (1e-2,),
                    description: str | None = None) -> CurveMethod:
  """A :data:`CURVE_METHODS` entry for ``peel_jax.invert_block`` whose budgets are tolerances: budget ``t`` runs
  ``SolverConfig()`` with ``config_overrides`` and ``tol=t`` (every other field, the iteration budgets included, at
  its default), plus the ``'default'`` point. For a solver with stages that an iteration budget cannot cap alike (the
  fixed-point fast path, then the AL on the images it leaves), this traces what a user gets at each tolerance."""
  config = dataclasses.replace(peel_jax.SolverConfig(), **config_overrides).validate()

  def solve(block, y, budget):
    cfg = config if budget is None else dataclasses.replace(config, tol=float(budget))
    return peel_jax.invert_block(block, y, config=cfg)

  return CurveMethod(
      runner=budgeted(solve, warm_each=True, default_point=True), ladder=tuple(float(t) for t in ladder),
      quick_ladder=tuple(float(t) for t in quick_ladder), unit="tolerance (SolverConfig.tol)",
      description=description or f"peel_jax.invert_block, SolverConfig() with {config_overrides or 'no overrides'}",
      config=dataclasses.asdict(config))


def _fixed_point_solve(block, y, budget):
  return fixed_point(block, y, iters=int(budget), tol=TINY_TOL)


def _authors_jax_solve(block, y, budget, chunk: int = 10):
  return authors_penalty(block, y, key=jax.random.key(0), steps=int(budget), chunk=chunk)


def _torch_applies(block) -> None:
  from benchmarks import authors_torch as _at

  _at.TorchPaperBlock(block)  # raises ValueError unless the identity paper block


def _torch_runner(prob: CurveProblem, budgets: tuple, timing: Timing) -> Iterator[dict]:
  """The paper's eager loop, one run of ``max(budgets)`` steps, ``x`` and the time taken at every budget.

  The time at a checkpoint runs from the call of ``authors_torch`` (seeding, the random start, building Adam included)
  to the end of that checkpoint's Adam step, less the time spent copying ``x`` at earlier checkpoints. (``p`` and ``n``
  are clamped after the step; ``x`` is not, so the copy is that step's final ``x``.)
  """
  import torch
  from benchmarks import authors_torch as _at

  tblock, yt = _at.TorchPaperBlock(prob.block), _at.to_nchw(prob.y)
  marks, steps = set(int(b) for b in budgets), int(max(budgets))
  default_threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    t0 = time.perf_counter()
    _at.authors_torch(tblock, yt, steps=min(steps, 50), seed=1)  # warm-up: first-call allocations, oneDNN setup
    warm_s = time.perf_counter() - t0
    runs, timed = [], 0.0
    while len(runs) < max(1, timing.repeats):
      run = _torch_checkpointed(_at, tblock, yt, steps, marks)
      runs.append(run)
      timed += run["total"]
      if timed >= timing.min_time:
        break
  finally:
    torch.set_num_threads(default_threads)
  last = runs[-1]
  for b in sorted(marks):
    x_hat = jnp.asarray(last["x"][b].permute(0, 2, 3, 1).numpy())
    yield {"budget": b, "seconds": float(np.median([r["times"][b] for r in runs])), "x_hat": x_hat,
           "timed_calls": len(runs), "first_call_s": warm_s if b == min(marks) else None, "iterations": b,
           "converged": None, "torch_num_threads": 1, "torch_default_num_threads": default_threads,
           "warmup": f"one run of {min(steps, 50)} steps, seed 1"}


def _torch_checkpointed(_at, tblock, yt, steps: int, marks: set) -> dict:
  import torch
  from torch.optim.optimizer import register_optimizer_step_post_hook

  state = {"k": 0, "paused": 0.0}
  times, xs = {}, {}

  def hook(opt, args, kwargs):
    t = time.perf_counter()
    state["k"] += 1
    if state["k"] in marks:
      times[state["k"]] = t - start - state["paused"]
      xs[state["k"]] = opt.param_groups[0]["params"][0].detach().clone()  # x: authors_torch's Adam([x, p, n])
      state["paused"] += time.perf_counter() - t

  handle = register_optimizer_step_post_hook(hook)
  try:
    start = time.perf_counter()
    x_final = _at.authors_torch(tblock, yt, steps=steps, seed=0)
    total = time.perf_counter() - start - state["paused"]
  finally:
    handle.remove()
  if state["k"] != steps or not torch.equal(xs[steps], x_final):
    raise RuntimeError(f"the optimizer step hook saw {state['k']} steps of {steps}, or not x: authors_torch's loop "
                       "is no longer one Adam([x, p, n]) step per iteration; the checkpoints would be wrong")
  return {"times": times, "x": xs, "total": total}


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


CURVE_METHODS: dict[str, CurveMethod] = {
    "ours": ours_tolerances({}, description="peel_jax.invert_block, the library's default SolverConfig() (fixed-point "
                                           "fast path, AL fallback), at each tolerance"),
    "ours_al": ours_variant({"fast_path": "off"}, description="peel_jax.invert_block, fast_path='off': the AL with "
                                                             "Levenberg-Marquardt and CGLS alone (the previous default)"),
    "ours_newton_gmres": ours_variant({"fast_path": "off", "inner": "newton_gmres", "cg_iters": 10},
                                      ladder=(1, 2, 3, 4, 6, 8, 12),
                                      description="peel_jax.invert_block, fast_path='off', inner='newton_gmres' "
                                                  "(GMRES(10) on J d = -r)"),
    "fixed_point": CurveMethod(
        runner=budgeted(_fixed_point_solve, warm_each=False),
        ladder=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100, 200), quick_ladder=(1, 4, 16),
        unit="fixed-point iterations (iters, tol=1e-12)",
        description="peel_jax.baselines.fixed_point: x <- y - F(x) from y (Behrmann et al. 2019)",
        applies=_fixed_point_applies),
    "authors_jax": CurveMethod(
        runner=budgeted(_authors_jax_solve, warm_each=False),
        ladder=(10, 20, 50, 100, 200, 500, 1000), quick_ladder=(10, 20), unit="Adam steps",
        description="peel_jax.baselines.authors_penalty, key(0), python driver (our JAX port of the paper's method)",
        # --quick: chunks of 2 steps; compiling the default 10 unrolled Adam steps took 10-16 s on the loaded 2 cores
        quick_runner=budgeted(functools.partial(_authors_jax_solve, chunk=2), warm_each=False)),
    REFERENCE: CurveMethod(
        runner=_torch_runner, ladder=(10, 20, 50, 100, 200, 500, 1000), quick_ladder=(10, 20),
        unit="Adam steps (checkpoints of one run)",
        description="benchmarks.authors_torch.authors_torch, the paper's eager PyTorch loop, seed 0, 1 torch thread",
        applies=_torch_applies),
}


# --- the run ----------------------------------------------------------------------------------------------------------


def _score(prob: CurveProblem, x_hat) -> dict:
  x_hat = jnp.asarray(x_hat, prob.x.dtype)
  err = float(np.asarray(peel_jax.relative_error(x_hat, prob.x))[0])
  res = float(np.asarray(peel_jax.relative_residual(prob.block, x_hat, prob.y))[0])
  return {"rel_error": err, "residual": res}


def run(problems: tuple, gains: tuple, methods: tuple, quick: bool, timing: Timing, log=print) -> list[dict]:
  """Every point of every ``(problem, gain, method)``; logs one line per point."""
  points = []
  for label in problems:
    for gain in gains:
      prob = curve_problem(label, gain)
      for name in methods:
        method = CURVE_METHODS[name]
        if method.applies is not None:
          try:
            method.applies(prob.block)
          except ValueError as e:
            log(f"  skip {label} g={gain} {name}: {e}")
            continue
        budgets = method.quick_ladder if quick else method.ladder
        for raw in method(prob, tuple(budgets), timing, quick):
          x_hat = raw.pop("x_hat")
          p = {"method": name, "problem": label, "channels": prob.channels, "size": prob.size, "branch_gain": gain,
               "batch": 1, "image": 0, **raw, **_score(prob, x_hat), "load_1min": os.getloadavg()[0]}
          points.append(p)
          log(format_point(p))
  return points


HEADER = (f"{'problem':<8} {'gain':>4} {'method':<14} {'budget':>7} {'seconds':>9} {'rel err':>8} {'residual':>8} "
          f"{'calls':>5} {'first s':>7} {'load':>5}")


def format_point(p: dict) -> str:
  first = "" if p["first_call_s"] is None else f"{p['first_call_s']:.2f}"
  return (f"{p['problem']:<8} {p['branch_gain']:>4.1f} {p['method']:<14} {str(p['budget']):>7} {p['seconds']:>9.3g} "
          f"{p['rel_error']:>8.1e} {p['residual']:>8.1e} {p['timed_calls']:>5d} {first:>7} {p['load_1min']:>5.1f}")


# --- time to a given error --------------------------------------------------------------------------------------------


def _curves(points: list[dict]) -> dict:
  """``{(problem, gain): {method: [points]}}`` in run order."""
  out: dict = {}
  for p in points:
    out.setdefault((p["problem"], p["branch_gain"]), {}).setdefault(p["method"], []).append(p)
  return out


def first_at_or_below(pts: list[dict], level: float, metric: str = "rel_error") -> dict | None:
  """The measured point with the least time among those with ``metric <= level`` (``None`` if there is none)."""
  hits = [p for p in pts if p[metric] <= level]
  return min(hits, key=lambda p: p["seconds"]) if hits else None


def time_to_error(points: list[dict], levels: tuple = LEVELS, metric: str = "rel_error",
                  reference: str = REFERENCE) -> list[dict]:
  """One row per (problem, gain, method, level): the time to reach ``metric <= level``, and the ratio to ``reference``.

  ``ratio_vs_reference`` is the reference's time at that level over the method's. Where the reference did not reach
  the level, its time for its whole budget (its slowest point) is used and ``ratio_kind`` is ``'lower_bound'``; where
  the method did not reach it, the ratio is ``None``.
  """
  rows = []
  for (problem, gain), by_method in _curves(points).items():
    ref_pts = by_method.get(reference)
    for method, pts in by_method.items():
      best = min(pts, key=lambda p: p[metric])
      for level in levels:
        hit = first_at_or_below(pts, level, metric)
        row = {"problem": problem, "branch_gain": gain, "method": method, "metric": metric, "level": level,
               "reached": hit is not None, "seconds": None if hit is None else hit["seconds"],
               "budget": None if hit is None else hit["budget"], "value": None if hit is None else hit[metric],
               "best": best[metric], "best_seconds": best["seconds"], "best_budget": best["budget"],
               "ratio_vs_reference": None, "ratio_kind": None}
        if hit is not None and ref_pts:
          ref_hit = first_at_or_below(ref_pts, level, metric)
          if ref_hit is not None:
            row["ratio_vs_reference"] = ref_hit["seconds"] / hit["seconds"]
            row["ratio_kind"] = "exact"
          else:
            row["ratio_vs_reference"] = max(p["seconds"] for p in ref_pts) / hit["seconds"]
            row["ratio_kind"] = "lower_bound"
        rows.append(row)
  return rows


def _cell(r: dict, reference: str) -> str:
  if not r["reached"]:
    return f"not reached (best {r['best']:.1e})"
  ratio = ""
  if r["method"] != reference and r["ratio_vs_reference"] is not None:
    ratio = f"; {'>=' if r['ratio_kind'] == 'lower_bound' else ''}{r['ratio_vs_reference']:.3g}x"
  return f"{r['seconds']:.3g} s (b={r['budget']}{ratio})"


def markdown_table(rows: list[dict], reference: str = REFERENCE) -> str:
  """Time to reach each level per (problem, gain, method); cells ``seconds (b=budget; ratio vs reference)``."""
  levels = list(dict.fromkeys(r["level"] for r in rows))
  metric = rows[0]["metric"] if rows else "rel_error"
  head = ("| problem | gain | method | " + " | ".join(f"to {metric} <= {lv:.0e}" for lv in levels)
          + " | best (s, budget) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  keys = list(dict.fromkeys((r["problem"], r["branch_gain"], r["method"]) for r in rows))
  for problem, gain, method in keys:
    rs = {r["level"]: r for r in rows if (r["problem"], r["branch_gain"], r["method"]) == (problem, gain, method)}
    b = rs[levels[0]]
    lines.append(f"| {problem} | {gain:.1f} | {method} | " + " | ".join(_cell(rs[lv], reference) for lv in levels)
                 + f" | {b['best']:.1e} ({b['best_seconds']:.3g} s, b={b['best_budget']}) |")
  return "\n".join(lines)


# --- the figure -------------------------------------------------------------------------------------------------------

_STYLE = {"ours": ("tab:blue", "o"), "fixed_point": ("tab:green", "s"), "authors_jax": ("tab:orange", "^"),
          REFERENCE: ("tab:red", "v")}
_EXTRA_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def _style(method: str, order: list[str]) -> tuple:
  if method in _STYLE:
    return _STYLE[method]
  extra = [m for m in order if m not in _STYLE]
  return _EXTRA_COLOURS[extra.index(method) % len(_EXTRA_COLOURS)], "D"


def plot(points: list[dict], path: str, title: str = "") -> None:
  """Log-log error and residual against seconds per image: a row pair per problem, a column per gain.

  One line per method through its budget points (in budget order), a star at a solver's default config, dashed
  horizontal lines at the error levels of the ``time_to_error`` table.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = _curves(points)
  problems = list(dict.fromkeys(k[0] for k in curves))
  gains = list(dict.fromkeys(k[1] for k in curves))
  methods = list(dict.fromkeys(p["method"] for p in points))
  nrows, ncols = 2 * len(problems), len(gains)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 2.9 * nrows + 0.8), squeeze=False,
                           layout="constrained")
  for i, problem in enumerate(problems):
    for j, gain in enumerate(gains):
      by_method = curves.get((problem, gain), {})
      for row, (metric, name) in enumerate((("rel_error", "rel. input error"), ("residual", "rel. residual"))):
        ax = axes[2 * i + row, j]
        for method in methods:
          pts = by_method.get(method, [])
          colour, marker = _style(method, methods)
          line = [p for p in pts if p["budget"] != DEFAULT]
          if line:
            ax.plot([p["seconds"] for p in line], [max(p[metric], 1e-10) for p in line], color=colour,
                    marker=marker, ms=4, lw=1.3, label=method)
          for p in pts:
            if p["budget"] == DEFAULT:
              ax.plot(p["seconds"], max(p[metric], 1e-10), color=colour, marker="*", ms=13, mec="k", mew=0.6,
                      ls="none", label=f"{method} (default config)")
        for level in LEVELS:
          ax.axhline(level, color="0.45", lw=0.8, ls=(0, (2, 3)), zorder=2.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", color="0.92", lw=0.6)
        ax.set_title(f"{problem}, gain {gain:g}: {name}", fontsize=10)
        ax.set_ylabel(name, fontsize=9)
        if 2 * i + row == nrows - 1:
          ax.set_xlabel("seconds per image (steady state, batch 1)", fontsize=9)
        ax.tick_params(labelsize=8)
  handles, labels = {}, []
  for ax in axes.flat:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      if lab not in handles:
        handles[lab] = h
        labels.append(lab)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center", ncol=min(len(labels), 5),
             fontsize=9, frameon=False)
  _atomic(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
  plt.close(fig)


# --- output -----------------------------------------------------------------------------------------------------------


def _refuse_existing(paths: list[str], overwrite: bool) -> None:
  for path in paths:
    if path and os.path.exists(path) and not overwrite:
      raise SystemExit(f"refusing to overwrite existing {path}; pass --overwrite to replace it")


def _atomic(path: str, write: Callable, binary: bool = False) -> None:
  """Writes ``path`` through a temporary file in its directory and ``os.replace`` (mode as ``open`` would give)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(path) + ".", dir=directory)
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def metadata(argv: list[str], methods: tuple, quick: bool, timing: Timing) -> dict:
  meta = {
      "command": "python -m benchmarks.block_curves" + "".join(f" {a}" for a in argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
      "cpu_model": block_solver.cpu_model(), "cpu_count": os.cpu_count(),
      "load_average_start": list(os.getloadavg()),
      "versions": block_solver._versions(),
      "git_commit": block_solver._git_commit(),
      "peel_jax_source_sha256": block_solver._source_digest(),
      "problems": "zoo.block_problem('paper', channels, size, n=8, branch_gain, seed=0), image 0 (batch 1)",
      "timing": dataclasses.asdict(timing),
      "levels": list(LEVELS), "reference": REFERENCE, "tiny_tol": TINY_TOL,
      "methods": {m: {"description": CURVE_METHODS[m].description, "unit": CURVE_METHODS[m].unit,
                      "budgets": list(CURVE_METHODS[m].quick_ladder if quick else CURVE_METHODS[m].ladder),
                      **({"config": CURVE_METHODS[m].config} if CURVE_METHODS[m].config is not None else {})}
                  for m in methods},
      "threads": {"XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")},
      "quick": quick,
  }
  if REFERENCE in methods:
    import torch

    meta["versions"]["torch"] = torch.__version__
    meta["threads"].update(torch_default_num_threads=torch.get_num_threads(), torch_num_threads_timed=1)
  return meta


def parse_args(argv):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.block_curves", description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="toy only, tiny ladders (smoke test)")
  ap.add_argument("--problems", default=None, help=f"comma-separated, of {tuple(PROBLEMS)} or cC/sS "
                                                   "(default: all; --quick: toy)")
  ap.add_argument("--gains", default=",".join(str(g) for g in GAINS), help="comma-separated branch gains")
  ap.add_argument("--methods", default=None, help=f"comma-separated subset of {tuple(CURVE_METHODS)} (default: all; "
                                                  f"{REFERENCE} only where torch imports)")
  ap.add_argument("--out", default="benchmarks/results/block_curves.json", help="JSON output path")
  ap.add_argument("--png", default="benchmarks/block_curves.png", help="figure path ('' for none)")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --out / --png")
  ap.add_argument("--repeats", type=int, default=None,
                  help=f"most timed calls per point (default {Timing.repeats}; --quick: {QUICK_TIMING.repeats})")
  ap.add_argument("--min-time", type=float, default=None,
                  help=f"stop repeating once this many seconds are timed (default {Timing.min_time}; --quick: "
                       f"{QUICK_TIMING.min_time})")
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.methods is None:
    methods = tuple(m for m in CURVE_METHODS if m != REFERENCE or torch_available())
  else:
    methods = tuple(m for m in args.methods.split(",") if m)
  bad = [m for m in methods if m not in CURVE_METHODS]
  if bad or not methods:
    raise SystemExit(f"unknown method(s) {bad}; expected a subset of {tuple(CURVE_METHODS)}")
  problems = tuple(p for p in (args.problems or ("toy" if args.quick else ",".join(PROBLEMS))).split(",") if p)
  for p in problems:
    try:
      parse_problem(p)
    except ValueError as e:
      raise SystemExit(str(e)) from None
  try:
    gains = tuple(float(g) for g in args.gains.split(",") if g)
  except ValueError:
    raise SystemExit(f"--gains must be comma-separated numbers, got {args.gains!r}") from None
  _refuse_existing([args.out, args.png], args.overwrite)
  base = QUICK_TIMING if args.quick else Timing()
  timing = Timing(base.repeats if args.repeats is None else args.repeats,
                  base.min_time if args.min_time is None else args.min_time)
  meta = metadata(argv, methods, args.quick, timing)
  print(f"# {meta['command']}\n# {meta['date']}  {meta['devices']}  {meta['cpu_model']} x{meta['cpu_count']}  "
        f"jax {meta['versions']['jax']}  load {meta['load_average_start']}", flush=True)
  print(HEADER, flush=True)
  t0 = time.perf_counter()
  points = run(problems, gains, methods, args.quick, timing, log=lambda s: print(s, flush=True))
  meta["total_wall_s"] = time.perf_counter() - t0
  meta["load_average_end"] = list(os.getloadavg())
  loads = [p["load_1min"] for p in points]
  meta["load_1min_during"] = {"min": min(loads), "median": float(np.median(loads)), "max": max(loads)}
  result = {"meta": meta, "points": points, "time_to_error": time_to_error(points),
            "time_to_residual": time_to_error(points, metric="residual")}
  print("\n" + markdown_table(result["time_to_error"]))
  print(f"# total {meta['total_wall_s']:.0f} s; load average at end {meta['load_average_end']}")
  _refuse_existing([args.out, args.png], args.overwrite)  # again: another run may have written them meanwhile
  _atomic(args.out, lambda f: json.dump(result, f, indent=1))
  print(f"# wrote {args.out}")
  if args.png:
    plot(points, args.png, title=f"{meta['command']}\n{meta['date']}, {meta['cpu_count']} CPU cores, 1-min load "
                                 f"{meta['load_1min_during']['median']:.1f} (median); dashed: the table's error levels")
    print(f"# wrote {args.png}")
  return result


if __name__ == "__main__":
  main()
