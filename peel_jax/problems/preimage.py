"""The most natural exact preimage: the image of least total variation that reproduces the observation.

Per image, with ``f`` the network up to ``layer``, ``y`` the observation and ``s = ||y||``:

    min_x  (lambda_tv / 2) R_tv(x)    s.t.  f(x) = y,   lo <= x <= hi,

``R_tv(x) = ||D x / V||^2 / (H W)`` the total variation with exponent 2 of the Mahendran-Vedaldi baseline
(:func:`peel_jax.baselines.mahendran_vedaldi.total_variation`, the same units: ``V = B / 6.5``, ``B`` the pixel
scale of the box), written as the least-squares vector ``sqrt(lambda_tv / (H W)) D x / V`` so that the engine's
Levenberg-Marquardt applies. Where ``layer`` ends in a ReLU (a torchvision block's post-add ReLU, or the stem's
``relu``), ``y = relu(z)`` is split exactly as :func:`peel_jax.invert_block` splits it: the equality ``z = y`` where
``y > 0`` and the inequality ``z <= 0`` where ``y = 0``; elsewhere (the paper variant, the pooled stem output) the
equality is ``f(x) = y``. Equalities and inequalities are scaled by ``1 / s`` and carried by the engine's augmented
Lagrangian (:mod:`peel_jax.solver.engine`); the box by projection. The merit (best iterate, convergence) is the
observation residual ``||f(x) - y|| / ||y||``.

Observed at a max-pooled ReLU stem's output (``'maxpool'`` of a torchvision ResNet), a gradient through the pool
reaches only each window's current argmax, and the equality ``f(x) = y`` stalls at 1.5-4% observation residual
there. :func:`natural_preimage` then solves the same problem with each window's maximum chosen as a discrete variable
(:mod:`peel_jax.problems.pool_choice`: linear constraints per choice, the choice updated between rounds), which is
exact on the tiny test network. Past the pool (``'layer1'`` ...) the equality through the pool is still used.

Where the observation determines the image, every feasible ``x`` is the image and the prior only steers the path;
where it does not (fewer informative values than pixels, :func:`peel_jax.certify_network`), this picks, among the
exact preimages, the smoothest: a data-free choice, never the truth. Measurements: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from peel_jax._features import features
from peel_jax.solver import engine
from peel_jax.solver.config import SolverConfig

TV_RATIO = 6.5  # V = B / TV_RATIO, as the Mahendran-Vedaldi baseline


@flax.struct.dataclass
class PreimageNet:
  """The network up to ``layer``, how its output is split and the box (shared by every image).

  ``before`` names the feature whose ReLU gives ``y`` (``None``: no split, the equality is ``f(x) = y``); ``last``
  is the block that maps ``before`` to ``z`` (``None`` when ``before`` already is ``z``, as ``'bn1'`` for ``'relu'``).
  """

  variables: Any
  last: Any
  lo: jax.Array
  hi: jax.Array
  model: Any = flax.struct.field(pytree_node=False)
  layer: str = flax.struct.field(pytree_node=False)
  before: str | None = flax.struct.field(pytree_node=False, default=None)


class PreimageData(NamedTuple):
  y: jax.Array  # one image's observation
  scale: jax.Array  # ||y||
  weight: jax.Array  # the prior's weight sqrt(lambda_tv / (H W)) / V for this image (0: no prior)


def pre_relu(x, net: PreimageNet):
  """``z`` for one image ``x`` ``(H, W, 3)``: the value whose ReLU is the observation (``f(x)`` without a split)."""
  if net.before is None:
    return features(net.model, net.variables, x[None], net.layer)[net.layer][0]
  h = features(net.model, net.variables, x[None], net.before)[net.before]
  return (h if net.last is None else net.last.pre_activation(h))[0]


def tv_vector(x, weight):
  """``weight * (D_j x, D_i x)``: forward differences along columns and rows, zero past the last (one image)."""
  dj = jnp.concatenate([x[:, 1:] - x[:, :-1], jnp.zeros_like(x[:, :1])], axis=1)
  di = jnp.concatenate([x[1:] - x[:-1], jnp.zeros_like(x[:1])], axis=0)
  return weight * dj, weight * di


def _objective(x, d: PreimageData, net: PreimageNet):
  return tv_vector(x, d.weight)


def _no_residual(x, d, net):
  return ()


def _equality(x, d: PreimageData, net: PreimageNet):
  z = pre_relu(x, net)
  if net.before is None:
    return (z - d.y) / d.scale
  return jnp.where(d.y > 0, z - d.y, 0.0) / d.scale


def _inequality(x, d: PreimageData, net: PreimageNet):
  if net.before is None:
    return ()
  return jnp.where(d.y > 0, 0.0, pre_relu(x, net)) / d.scale


def _bounds(x, d, net: PreimageNet):
  return net.lo, net.hi


def _merit(x, d: PreimageData, net: PreimageNet):
  z = pre_relu(x, net)
  out = z if net.before is None else jax.nn.relu(z)
  return jnp.sqrt(jnp.sum((out - d.y) ** 2)) / d.scale


NATURAL_PREIMAGE = engine.Problem(residual=_no_residual, bounds=_bounds, merit=_merit, equality=_equality,
                                  inequality=_inequality, objective=_objective)


def split_point(model, variables, layer: str):
  """``(before, last)`` of :class:`PreimageNet` for ``layer``: where its ReLU output is split, if anywhere."""
  from peel_jax import blocks as _blocks
  from peel_jax.inversion import plan as _plan

  if layer == "relu":
    return "bn1", None
  if layer == "maxpool" or not model.post_activation or model.activation != "relu":
    return None, None
  stage, index = _plan.depth(model, layer)
  return _plan.input_name(model, stage, index), _blocks.residual_block(model, variables, stage, index)


def natural_preimage(model, variables, layer: str, observed, x0, *, box=None, lambda_tv: float = 1e-3,
                     pixel_scale: float = 1.0, config: SolverConfig | None = None, iters: int = 40,
                     choice: Any = "auto"):
  """Solves ``min R_tv(x) s.t. f(x) = observed`` per image from ``x0`` (see the module docstring).

  Args:
    model, variables: the network; ``layer``: the observed layer (one of
      :func:`peel_jax.inversion.plan.invertible_layers`).
    observed: ``(N, ...)`` the observation; ``x0``: ``(N, H, W, 3)`` the starts.
    box: ``(lo, hi)`` arrays of one image's shape, or ``None``.
    lambda_tv: the prior's weight, in the Mahendran-Vedaldi baseline's units: a scalar (> 0), or one value per
      image ``(N,)`` (>= 0; an image with 0 gets no prior: the nearest exact preimage the solver finds from its start).
    pixel_scale: ``B``, the largest magnitude of a valid pixel value (sets ``V = B / 6.5``).
    config: ``cg_iters``, ``damping``, ``rho``, ``inner_iters``, ``tol``, ``driver`` (``max_iters``: ``iters``).
    iters: iteration budget per image (>= 1).
    choice: where ``layer`` is a max-pooled ReLU stem's output (:func:`peel_jax.problems.pool_choice.applies`),
      ``'auto'`` chooses the window maxima with the default :class:`peel_jax.problems.pool_choice.ChoiceSchedule`,
      a ``ChoiceSchedule`` with that one, and ``None`` keeps the equality through the pool. Ignored elsewhere.
      The choice measured best at ``config.rho`` 100 and ``cg_iters`` 10-15 (``benchmarks/RESULTS.md``).

  Returns:
    ``(x, iterations, observation_residual)``: the best iterate by observation residual ``(N, H, W, 3)``, the
    iterations and the residual per image ``(N,)``.

  Raises:
    ValueError: ``lambda_tv`` not positive, ``iters`` < 1, or a ``choice`` that is neither ``'auto'``, ``None``
      nor a ``ChoiceSchedule`` (or has a field < 1).
  """
  _check_lambda(lambda_tv, observed.shape[0])
  if int(iters) < 1:
    raise ValueError(f"iters must be >= 1, got {iters!r}")
  schedule = _schedule(choice)
  config = SolverConfig() if config is None else config
  lo, hi = engine.box_bounds(box, x0.shape[1:], x0.dtype)
  hw = x0.shape[1] * x0.shape[2]
  lam = jnp.broadcast_to(jnp.asarray(lambda_tv, x0.dtype), x0.shape[:1])
  weight = jnp.sqrt(lam / hw) * (TV_RATIO / pixel_scale)
  x0 = jnp.clip(x0, lo[None], hi[None])
  if schedule is not None and _pool_choice().applies(model, layer):
    from peel_jax import blocks as _blocks

    return _pool_choice().choose_maxima(_blocks.stem_block(model, variables), observed, x0, lo, hi, weight, config,
                                        iters=int(iters), schedule=schedule)
  before, last = split_point(model, variables, layer)
  net = PreimageNet(variables, last, lo, hi, model, layer, before)
  scale = jnp.maximum(jnp.sqrt(jnp.sum(observed * observed, axis=tuple(range(1, observed.ndim)))), 1e-30)
  st = engine.solve(NATURAL_PREIMAGE, config, x0, PreimageData(observed, scale, weight), net,
                    method=engine.LM, budget=int(iters))
  return st.best_u, st.k, st.best_merit


def _check_lambda(lambda_tv, n: int):
  """Raises ValueError unless ``lambda_tv`` is a scalar > 0 or ``n`` values >= 0 (checked when concrete)."""
  if np.ndim(lambda_tv) == 0:
    if not engine.is_traced(lambda_tv) and not float(lambda_tv) > 0:
      raise ValueError(f"lambda_tv must be > 0, got {lambda_tv!r}")
    return
  if np.shape(lambda_tv) != (n,):
    raise ValueError(f"lambda_tv must be a scalar or one value per image ({n},), got shape {np.shape(lambda_tv)}")
  if not engine.is_traced(lambda_tv) and not np.all(np.asarray(lambda_tv) >= 0):
    raise ValueError(f"lambda_tv must be >= 0 per image, got {np.asarray(lambda_tv)}")


def _pool_choice():
  from peel_jax.problems import pool_choice  # imports this module (tv_vector): imported on use

  return pool_choice


def _schedule(choice):
  """The :class:`~peel_jax.problems.pool_choice.ChoiceSchedule` of ``choice``, or ``None``."""
  if choice is None:
    return None
  if isinstance(choice, str) and choice == "auto":
    return _pool_choice().ChoiceSchedule()
  if isinstance(choice, _pool_choice().ChoiceSchedule):
    return choice.validate()
  raise ValueError(f"choice must be 'auto', None or a ChoiceSchedule, got {choice!r}")
