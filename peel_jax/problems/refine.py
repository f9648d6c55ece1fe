"""End-to-end refinement: the whole map pixels -> layer as one engine problem per image.

Per image, with ``f`` the network up to ``layer`` and ``s = ||y||``:

    min_x  0.5 || (f(x) - y) / s ||^2     s.t.  lo <= x <= hi  (the pixel box, by projection),

solved by the engine's Levenberg-Marquardt (:mod:`peel_jax.solver.engine`); the merit is the observation residual
``||f(x) - y|| / ||y||``. A stride-2 block has fewer outputs than inputs, so the block-wise pass returns *a*
preimage; the whole map can still be determined (more observed values than pixels), and this repairs it. Measured
effect on the demo: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp

from peel_jax._features import features
from peel_jax.solver import engine
from peel_jax.solver.config import SolverConfig


@flax.struct.dataclass
class Net:
  """The network up to ``layer`` (``model``, ``layer`` static) and the pixel box of one image."""

  variables: Any
  lo: jax.Array
  hi: jax.Array
  model: Any = flax.struct.field(pytree_node=False)
  layer: str = flax.struct.field(pytree_node=False)


class RefineData(NamedTuple):
  y: jax.Array  # the observation of one image
  scale: jax.Array  # ||y||


def _residual(x, d: RefineData, net: Net):
  return (features(net.model, net.variables, x[None], net.layer)[net.layer][0] - d.y) / d.scale


def _bounds(x, d, net: Net):
  return net.lo, net.hi


def _merit(x, d, net: Net):
  r = _residual(x, d, net)
  return jnp.sqrt(jnp.sum(r * r))


OBSERVATION = engine.Problem(residual=_residual, bounds=_bounds, merit=_merit)


def refine_image(model, variables, layer, observed, x, *, box=None, config: SolverConfig | None = None,
                 iters: int = 20):
  """Projected LM on ``|| f(x) - observed ||^2`` over the pixels from ``x`` (see the module docstring).

  Args:
    model, variables: the network; ``layer``: the observed layer.
    observed: ``(N, ...)`` the observation; ``x``: ``(N, H, W, 3)`` the start.
    box: ``(lo, hi)`` arrays of one image's shape, or ``None``.
    config: ``cg_iters``, ``damping``, ``tol``, ``driver`` (``max_iters`` is replaced by ``iters``).
    iters: iteration budget per image (>= 1).

  Returns:
    ``(x, iterations)``: the best iterate by observation residual ``(N, H, W, 3)`` and iterations per image ``(N,)``.
  """
  config = SolverConfig() if config is None else config
  lo, hi = engine.box_bounds(box, x.shape[1:], x.dtype)
  scale = jnp.maximum(jnp.sqrt(jnp.sum(observed * observed, axis=tuple(range(1, observed.ndim)))), 1e-30)
  st = engine.solve(OBSERVATION, config, x, RefineData(observed, scale), Net(variables, lo, hi, model, layer),
                    method=engine.LM, budget=iters)
  return st.best_u, st.k
