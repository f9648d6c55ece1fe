"""The paper's studies and the ones it left open, one runnable module each (``python -m experiments.NAME``).

Every module has a config dataclass whose docstring carries the exact command of its default run, writes
``OUT/config.json``, ``OUT/metrics.csv`` (one row per image and block), ``OUT/summary.json`` and figures, saves its
work per batch atomically, and resumes a killed run where it stopped. The shared machinery is in
:mod:`experiments._harness`.
"""
