"""Shared fixtures: strict JAX numerics, a bundled photo, seeds, and a summary of the errors measured vs torch.

Randomised torch networks and their Flax ports are cached for the session by ``torch_reference.ported``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from torch_reference import SEED, photo_batch

# Strict checking, as optimistix's test suite does: implicit rank promotion (``(N, H, W, C) + (C,)``) is an error,
# so every broadcast in the library must be spelled out. (``jax_numpy_dtype_promotion='strict'`` is not turned on:
# flax's own ``nn.avg_pool`` divides a float32 array by an int and fails under it.)
jax.config.update("jax_numpy_rank_promotion", "raise")

_REL_ERRORS = pytest.StashKey[dict]()


def pytest_configure(config):
  config.stash[_REL_ERRORS] = {}


def _merge_rel_errors(errors: dict, new: dict):
  for name, err in new.items():
    errors[name] = max(float(err), errors.get(name, 0.0))


def pytest_sessionfinish(session):
  """Under pytest-xdist (``make test``), a worker hands its errors to the controller, which prints the summary."""
  workeroutput = getattr(session.config, "workeroutput", None)
  if workeroutput is not None:
    workeroutput["rel_errors"] = dict(session.config.stash[_REL_ERRORS])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  _merge_rel_errors(node.config.stash[_REL_ERRORS], getattr(node, "workeroutput", {}).get("rel_errors", {}))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  errors = config.stash.get(_REL_ERRORS, {})
  if not errors:
    return
  terminalreporter.section("worst relative error, max-abs diff / max-abs of the reference")
  for name, err in sorted(errors.items()):
    terminalreporter.write_line(f"{name:<44s} {err:.2e}")


@pytest.fixture
def record_rel_error(request):
  """``record(name, err)``: keeps the worst error per name for the terminal summary.

  Names say the reference: ``torchvision ...`` (torchvision itself), ``reference ...`` (tests/torch_reference.py),
  ``blocks ...`` (the Flax model's own blocks).
  """
  errors = request.config.stash[_REL_ERRORS]

  def record(name: str, err: float):
    _merge_rel_errors(errors, {name: err})

  return record


@pytest.fixture(scope="session")
def photo():
  """A batch of two 96x96 photos, ``(2, 96, 96, 3)`` float32, ImageNet-normalised."""
  return photo_batch(96)


@pytest.fixture(scope="session")
def photo_factory():
  """``photo_factory(size, n=2)``: the photo batch at another resolution."""
  return photo_batch


@pytest.fixture
def seed():
  return SEED


@pytest.fixture
def rng(seed):
  return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _seed_torch(seed):
  import torch

  torch.manual_seed(seed)
