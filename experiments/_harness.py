"""The studies' run machinery, which lives in the library now (:mod:`peel_jax.runs`), and the PEEL methods that
``leakage_factors`` and ``defences`` share.

Kept so that every study (and research code written against it) keeps its ``from experiments import _harness as H``
import; every name re-exported here is :mod:`peel_jax.runs`'s own object, not a copy. The names defined here
(``PEEL_METHODS`` to :func:`refine_summary`) are the two studies' ``methods`` dimension: their config fields, the
:class:`peel_jax.NetworkConfig` of each method, and the per-image columns of their ``metrics.csv``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from peel_jax.runs import (  # noqa: F401  (re-exports)
    EXIT_BAD_INPUT, EXIT_STOPPED, PARTS, BadConfig, Run, Stopped, atomic_write, batch_mesh, batches, config_dict,
    describe, figure, jsonable, main, maybe_initialize_distributed, module_name, parse_config, progress, provenance,
    read_csv, save_figure, shard_batch, write_csv, write_json)

__all__ = [
    "EXIT_BAD_INPUT", "EXIT_STOPPED", "PARTS", "BadConfig", "Run", "Stopped", "atomic_write", "batch_mesh", "batches",
    "config_dict", "describe", "figure", "jsonable", "main", "maybe_initialize_distributed", "module_name",
    "parse_config", "progress", "provenance", "read_csv", "save_figure", "shard_batch", "write_csv", "write_json",
    "PEEL_METHODS", "methods_field", "peel_iters_field", "mv_steps_field", "validate_methods", "network_config",
    "block_rows", "image_columns", "refine_summary",
]

PEEL_METHODS = ("peel", "peel_blockwise")
"""``peel``: :func:`peel_jax.invert_network`'s default attack (the block-wise pass, then ``peel_iters`` iterations
towards an exact preimage from the better of the block-wise and a Mahendran-Vedaldi estimate, with the TV prior on
the images the counts leave underdetermined); ``peel_blockwise``: the paper's attack alone (the block-wise pass)."""


def methods_field():
  """The ``methods`` config field (a tuple of :data:`PEEL_METHODS`, default both)."""
  return dataclasses.field(default=PEEL_METHODS, metadata={
      "help": f"of {PEEL_METHODS}: the default attack (block-wise, then towards an exact preimage) and the paper's"})


def peel_iters_field():
  return dataclasses.field(default=200, metadata={
      "help": "iterations towards an exact preimage after the block-wise pass, method peel"})


def mv_steps_field():
  return dataclasses.field(default=400, metadata={
      "help": "gradient steps of the Mahendran-Vedaldi estimate that method peel may start from"})


def validate_methods(config) -> None:
  """Raises ``ValueError`` (one line) on unknown or repeated ``config.methods``, or ``peel_iters``/``mv_steps`` < 1."""
  bad = [m for m in config.methods if m not in PEEL_METHODS]
  if bad:
    raise ValueError(f"unknown method(s) {bad}; expected some of {PEEL_METHODS}")
  if not config.methods or len(set(config.methods)) != len(config.methods):
    raise ValueError(f"--methods takes one or more distinct names of {PEEL_METHODS}, got {config.methods}")
  low = [name for name in ("peel_iters", "mv_steps") if getattr(config, name) < 1]
  if low:
    raise ValueError(f"--{low[0].replace('_', '-')} must be >= 1, got {getattr(config, low[0])}")


def network_config(method: str, solver, config):
  """The :class:`peel_jax.NetworkConfig` of ``method`` with ``solver`` for every block."""
  import peel_jax

  if method == "peel":
    return peel_jax.NetworkConfig(block=solver, refine_iters=config.peel_iters, mv_steps=config.mv_steps)
  return peel_jax.NetworkConfig.blockwise(block=solver)


def block_rows(base: dict, report, i: int) -> list[dict]:
  """One row per inverted block of image ``i`` (deepest first, the stem last): input error, residual, convergence."""
  return [{**base, "block": blk.name, "input_rel_error": float(blk.input_rel_error[i]),
           "residual": float(blk.residual[i]), "iterations": int(blk.iterations[i]),
           "converged": bool(blk.converged[i])} for blk in report.blocks]


def image_columns(report, i: int) -> dict:
  """Image ``i``'s count bound ``null_dim_bound`` and, after a refinement (method ``peel``), ``blockwise_psnr``
  (the block-wise pass's PSNR before it), ``refine_start`` (``'blockwise'`` or ``'mahendran_vedaldi'``) and
  ``with_prior`` (the TV prior acted)."""
  out = {"null_dim_bound": int(np.asarray(report.null_dim_bound)[i])}
  if report.refine is not None:
    out.update(blockwise_psnr=float(np.asarray(report.refine.blockwise["psnr"])[i]),
               refine_start=report.refine.start[i], with_prior=bool(np.asarray(report.refine.with_prior)[i]))
  return out


def refine_summary(img: list[dict]) -> dict:
  """Of a group's image rows: the block-wise PSNR before the refinement and how many images started from the
  Mahendran-Vedaldi estimate and got the prior (empty without a refinement)."""
  if not img or "blockwise_psnr" not in img[0]:
    return {}
  return {"blockwise_psnr": describe([r["blockwise_psnr"] for r in img]),
          "images_started_from_mv": sum(r["refine_start"] == "mahendran_vedaldi" for r in img),
          "images_with_prior": sum(bool(r["with_prior"]) for r in img)}
