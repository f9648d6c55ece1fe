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

# Seconds per file, the sum of its tests' times under ``make test`` (2026-12-08, 2 cores; that run took 908 s),
# the slowest first. ``make test`` runs ``--dist loadfile --no-loadscope-reorder``: xdist hands whole files to its
# two workers in collection order, the next to whichever is nearly done. Slowest first (longest-processing-time-first
# scheduling) leaves only short files for the end, where one worker would otherwise run a long file alone. Unlisted
# files run last, in name order.
SLOWEST_FILES_FIRST = (
    "test_experiments.py",  # 348 (its studies share compiled programs: split in three files, they took 448 s)
    "test_invert_block.py",  # 302
    "test_invert_network.py",  # 167
    "test_audit.py",  # 108
    "test_natural_preimage.py",  # 98
    "test_cli.py",  # 93
    "test_one_program.py",  # 93
    "test_models.py",  # 73
    "test_throughput_smoke.py",  # 70
    "test_fast_path.py",  # 69
    "test_blocks.py",  # 41
    "test_certify_network.py",  # 40
    "test_benchmarks_smoke.py",  # 35
    "test_mahendran_vedaldi.py",  # 32
    "test_block_curves.py",  # 31
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: each file keeps its own order


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


@pytest.fixture(scope="session", autouse=True)
def _data_dir(tmp_path_factory):
  """Prepared datasets go to one temporary cache for the session (module-scoped fixtures included), never to the
  home directory. A test that sets ``PEEL_JAX_DATA_DIR`` itself gets this value back when it ends."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("PEEL_JAX_DATA_DIR", str(tmp_path_factory.getbasetemp() / "tfds"))
    yield


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
