"""The two drivers of the residual blocks of a backward pass: ``loop`` and ``scan``.

* ``loop`` inverts unit by unit from Python, each block with its solver's own driver (on CPU the engine's Python
  driver; the CPU default).
* ``scan`` inverts a stage's stacked identical blocks in one ``jax.lax.scan`` (reverse) whose body is
  ``invert_block(..., config=replace(config, driver='while_loop'))``: traceable, one compiled program per stage, the
  form for accelerators and for a ``jit`` around the whole pass.

The two run the same iterations; their results agree to float32 rounding where the solves converge (measurements:
``benchmarks/RESULTS.md``). Each yields, per block, a :class:`Solved` record.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from peel_jax._invert_block import invert_block
from peel_jax.blocks import Block
from peel_jax.inversion.plan import Unit, block_key
from peel_jax.solver.config import SolverConfig
from peel_jax.solver.engine import is_traced


class Solved(NamedTuple):
  """One inverted block: its name, the block, its estimated input, the observation it was given, the solver's info
  and its wall time (NaN under tracing)."""

  name: str
  block: Block
  x_hat: jax.Array
  y: jax.Array
  info: Any
  seconds: float


class Progress:
  """``True``: a tqdm bar on stderr; a callable ``(block_name, done, total)``; ``None``: silent."""

  def __init__(self, progress, total: int):
    self.fn = progress if callable(progress) else None
    self.bar = None
    self.total, self.done = total, 0
    if progress is True:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, desc="invert", unit="block", file=sys.stderr, leave=False)

  def update(self, name: str, count: int = 1):
    self.done += count
    if self.bar is not None:
      self.bar.set_postfix_str(name)
      self.bar.update(count)
    if self.fn is not None:
      self.fn(name, self.done, self.total)

  def close(self):
    if self.bar is not None:
      self.bar.close()


class Clock:
  """Wall time of eager work; NaN when the values are traced (time cannot be measured inside ``jit``)."""

  def __init__(self, *values):
    self.traced = is_traced(*values)
    self.t0 = time.perf_counter()

  def stop(self, value) -> float:
    if self.traced or is_traced(value):
      return math.nan
    jax.block_until_ready(value)
    return time.perf_counter() - self.t0


@functools.partial(jax.jit, static_argnames=("config",))
def scan_invert(stacked: Block, y, keys, config: SolverConfig):
  """Inverts stacked identical blocks (forward order along axis 0), deepest first, in one reverse ``lax.scan``.

  Returns ``(x_first, xs, infos)``: the input of the first stacked block, every stacked block's estimated input
  (``xs[i]`` for block ``i``) and their infos (stacked).
  """
  spec = stacked.spec

  def step(carry, inp):
    p, k = inp
    x, inf = invert_block(Block(p, spec), carry, key=k, config=config)
    return x, (x, inf)

  x, (xs, infs) = jax.lax.scan(step, y, (stacked.params, keys), reverse=True)
  return x, xs, infs


def _one(unit: Unit, y, key, model, config: SolverConfig, block_solver: Callable | None) -> list[Solved]:
  name = f"layer{unit.stage + 1}.{unit.first}"
  k = block_key(model, key, unit.stage, unit.first)
  clock = Clock(y)
  if block_solver is None:
    x_hat, info = invert_block(unit.block, y, key=k, config=config)
  else:
    x_hat, info = block_solver(unit.block, y, key=k)
  return [Solved(name, unit.block, x_hat, y, info, clock.stop(x_hat))]


def _scanned(unit: Unit, y, key, model, config: SolverConfig) -> list[Solved]:
  keys = jnp.stack([block_key(model, key, unit.stage, b) for b in range(unit.first, unit.last + 1)])
  clock = Clock(y)
  x_first, xs, infos = scan_invert(unit.block, y, keys, dataclasses.replace(config, driver="while_loop"))
  dt = clock.stop(x_first) / unit.size
  ys = [xs[i + 1] for i in range(unit.size - 1)] + [y]  # observation of stacked block i
  out = []
  for i in range(unit.size - 1, -1, -1):
    name = f"layer{unit.stage + 1}.{unit.first + i}"
    blk = unit.block.with_params(jax.tree.map(lambda a, i=i: a[i], unit.block.params))
    blk = Block(blk.params, dataclasses.replace(blk.spec, name=name))
    out.append(Solved(name, blk, xs[i], ys[i], jax.tree.map(lambda a, i=i: a[i], infos), dt))
  return out


def run_units(units: list[Unit], y, key, model, config: SolverConfig, block_solver: Callable | None,
              bar: Progress) -> tuple[jax.Array, list[Solved]]:
  """Inverts ``units`` in order from the observation ``y``; returns the stem's output estimate and every block's
  :class:`Solved` record, in inversion order."""
  solved = []
  for unit in units:
    recs = _scanned(unit, y, key, model, config) if unit.scan else _one(unit, y, key, model, config, block_solver)
    solved += recs
    bar.update(recs[0].name if len(recs) == 1 else f"layer{unit.stage + 1}.{unit.first}:{unit.last + 1}", len(recs))
    y = recs[-1].x_hat
  return y, solved
