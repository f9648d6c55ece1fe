"""Packaging: the wheel installs ``peel_jax`` only, and the installed package never imports the checkout's
``experiments``/``benchmarks`` (which stay runnable from a checkout as ``python -m experiments.NAME``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_wheel(tmp_path) -> str:
  """Builds the wheel from a copy of the checkout (so no build/ or egg-info lands in it); no network."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy2(os.path.join(ROOT, name), src / name)
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results")
  for pkg in ("peel_jax", "experiments", "benchmarks"):  # the studies are copied too: the wheel must leave them out
    shutil.copytree(os.path.join(ROOT, pkg), src / pkg, ignore=ignore)
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(dist), str(src)], check=True, timeout=600, capture_output=True)
  (wheel,) = [p for p in os.listdir(dist) if p.endswith(".whl")]
  return str(dist / wheel)


def test_wheel_installs_peel_jax_only(tmp_path):
  wheel = _build_wheel(tmp_path)
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    info = [n for n in names if ".dist-info/" in n]
    entry_points = z.read(next(n for n in info if n.endswith("entry_points.txt"))).decode()
    top_level = z.read(next(n for n in info if n.endswith("top_level.txt"))).decode().split()
  tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
  assert tops == {"peel_jax"}, tops
  assert top_level == ["peel_jax"]
  assert "peel-jax = peel_jax.cli:main" in entry_points
  for module in ("peel_jax/runs.py", "peel_jax/audit/__init__.py", "peel_jax/cli.py"):
    assert module in names


_NO_CHECKOUT = """
import sys
import peel_jax, peel_jax.cli, peel_jax.runs, peel_jax.audit
from peel_jax.cli import _parser
_parser().parse_args(["audit", "--images", "bundled:faces", "--out", "x"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("experiments", "benchmarks"))
assert not bad, bad
"""


def test_installed_package_does_not_import_the_checkout(tmp_path):
  # From an empty folder: nothing of experiments/ or benchmarks/ may be imported by the library or its command.
  subprocess.run([sys.executable, "-c", _NO_CHECKOUT], check=True, timeout=300, cwd=tmp_path)


def test_studies_and_benchmarks_run_from_a_checkout():
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  for module in ("experiments.toy_block", "benchmarks.block_solver"):
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, timeout=300,
                       capture_output=True, text=True)
    assert r.returncode == 0, (module, r.stderr[-2000:])
    assert "--out" in r.stdout or "usage" in r.stdout
