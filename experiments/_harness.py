"""The studies' run machinery, which lives in the library now: :mod:`peel_jax.runs`.

Kept so that every study (and research code written against it) keeps its ``from experiments import _harness as H``
import; every name here is :mod:`peel_jax.runs`'s own object, not a copy.
"""

from __future__ import annotations

from peel_jax.runs import (  # noqa: F401  (re-exports)
    EXIT_BAD_INPUT, EXIT_STOPPED, PARTS, BadConfig, Run, Stopped, atomic_write, batch_mesh, batches, config_dict,
    describe, figure, jsonable, main, maybe_initialize_distributed, module_name, parse_config, progress, provenance,
    read_csv, save_figure, shard_batch, write_csv, write_json)

__all__ = [
    "EXIT_BAD_INPUT", "EXIT_STOPPED", "PARTS", "BadConfig", "Run", "Stopped", "atomic_write", "batch_mesh", "batches",
    "config_dict", "describe", "figure", "jsonable", "main", "maybe_initialize_distributed", "module_name",
    "parse_config", "progress", "provenance", "read_csv", "save_figure", "shard_batch", "write_csv", "write_json",
]
