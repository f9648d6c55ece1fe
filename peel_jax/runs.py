"""Runs that survive a kill: a command line from a config dataclass, an output directory that resumes, sharding.

Shared by the ``peel-jax audit`` command and the studies in the repository's ``experiments/`` (which import it from
here: the installed package never imports ``experiments``).

* **Configs** are frozen dataclasses; :func:`parse_config` turns their fields into ``--flags`` (tuples are
  comma-separated lists, booleans are ``--x/--no-x``) and every module's ``--help`` lists them with their defaults.
* **Results that last** (:class:`Run`): ``OUT/config.json`` is written first. Work is cut into units (one setting
  and one batch of images); each finished unit is saved atomically as ``OUT/parts/UNIT.json`` (rows) and
  ``OUT/parts/UNIT.npz`` (arrays, such as reconstructions). A rerun with the same config skips finished units and
  goes on; a rerun with another config, or into a directory holding something else, is refused unless
  ``--overwrite``. The tables (``metrics.csv``, ``summary.json``) and figures are rebuilt from the parts at the end,
  each written to a temporary file and renamed into place, so no reader ever sees half a file.
* **Scale**: the images of a unit are sharded over the local devices along one mesh axis ``'batch'``
  (:func:`shard_batch`; the batch is padded with copies of its last image to a multiple of the device count, and
  every image is an independent problem, so the padding changes no result). Under ``--distributed`` (or
  ``PEEL_JAX_DISTRIBUTED=1``) ``jax.distributed.initialize()`` joins the processes of a multi-host slice; units are
  dealt round-robin over processes, each process writes its own parts to the shared ``OUT``, and process 0 builds
  the tables after a barrier.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import shutil
import sys
import time
import types
import typing
from typing import Any, Callable, Iterable, Sequence

import numpy as np

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
PARTS = "parts"


class BadConfig(Exception):
  """A user error (bad flag, unusable output directory, unreadable data): one line on stderr, exit status 2."""


class Stopped(Exception):
  """Raised after ``--stop-after`` units: the run is incomplete on purpose and resumes when rerun."""


# --- configs and the command line ----------------------------------------------------------------------------------


def _field_type(cls, f: dataclasses.Field):
  hint = typing.get_type_hints(cls)[f.name]
  origin = typing.get_origin(hint)
  args = typing.get_args(hint)
  optional = False
  if origin in (typing.Union, types.UnionType) and type(None) in args:
    optional = True
    (hint,) = [a for a in args if a is not type(None)]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is tuple:
    return "tuple", args[0], optional
  return "scalar", hint, optional


def _parse_scalar(kind, text: str):
  if kind is bool:
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"not a boolean: {text!r}")
  return kind(text)


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise BadConfig(message)


def module_name(cls) -> str:
  """The dotted module of ``cls`` (``experiments.toy_block`` also when run as ``python -m``)."""
  mod = cls.__module__
  if mod == "__main__":
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    mod = spec.name if spec is not None else mod
  return mod


def parse_config(cls, argv: Sequence[str] | None, description: str):
  """``(config, options)`` from the command line: one ``--flag`` per field of the dataclass ``cls``.

  ``options`` holds the run options that are not part of the config: ``overwrite``, ``stop_after``,
  ``distributed``. Field help comes from ``field.metadata['help']``.
  """
  p = _Parser(prog=f"python -m {module_name(cls)}", description=description,
              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for f in dataclasses.fields(cls):
    flag = "--" + f.name.replace("_", "-")
    shape, kind, optional = _field_type(cls, f)
    help_ = f.metadata.get("help", "")
    default = f.default
    if shape == "scalar" and kind is bool:
      p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
      continue
    if shape == "tuple":
      def conv(text, kind=kind, name=f.name):
        try:
          return tuple(_parse_scalar(kind, t.strip()) for t in text.split(",") if t.strip())
        except ValueError as e:
          raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: {e}") from None
      p.add_argument(flag, dest=f.name, type=conv, default=default, metavar=f"{kind.__name__.upper()},...",
                     help=help_ + " (comma-separated)")
    else:
      p.add_argument(flag, dest=f.name, type=kind, default=default, help=help_ + (" (optional)" if optional else ""))
  p.add_argument("--overwrite", action="store_true", help="replace an output directory holding other results")
  p.add_argument("--stop-after", type=int, default=None, metavar="N",
                 help="stop (exit status 3) after N more finished units; a rerun resumes")
  p.add_argument("--distributed", action="store_true", default=os.environ.get("PEEL_JAX_DISTRIBUTED") == "1",
                 help="call jax.distributed.initialize() (multi-host TPU/GPU slices); also PEEL_JAX_DISTRIBUTED=1")
  ns = vars(p.parse_args(argv))
  options = {k: ns.pop(k) for k in ("overwrite", "stop_after", "distributed")}
  config = cls(**ns)
  if hasattr(config, "validate"):
    try:
      config.validate()
    except ValueError as e:
      raise BadConfig(str(e)) from None
  return config, options


def config_dict(config) -> dict:
  """JSON-ready dict of a config dataclass (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config)))


# --- atomic files ----------------------------------------------------------------------------------------------------


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls ``write(tmp)`` for a temporary path beside ``path``, then renames it onto ``path`` (atomic on POSIX)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` atomically."""

  def w(tmp):
    with open(tmp, "w") as f:
      f.write(text)

  atomic_write(path, w)


def write_json(path: str, data: Any) -> None:
  """Writes JSON atomically (strict: NaN and inf are refused, write ``None`` instead)."""
  write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_csv(path: str, rows: Sequence[dict]) -> None:
  """Writes rows (dicts) as CSV atomically; the columns are the union of the keys, in first-seen order."""
  cols: list[str] = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  buf = io.StringIO()
  wr = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
  wr.writeheader()
  for r in rows:
    wr.writerow({k: _csv_value(v) for k, v in r.items()})

  def w(tmp):
    with open(tmp, "w") as f:
      f.write(buf.getvalue())

  atomic_write(path, w)


def _csv_value(v):
  if isinstance(v, float):
    return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
  return "" if v is None else v


def read_csv(path: str) -> list[dict]:
  """Reads a CSV written by :func:`write_csv` (values as strings)."""
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure atomically (format from the extension)."""
  fmt = os.path.splitext(path)[1].lstrip(".") or "png"
  atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))


def figure(width: float, height: float):
  """A matplotlib Figure on the Agg canvas (no pyplot, no global state)."""
  from matplotlib.figure import Figure

  return Figure(figsize=(width, height))


def jsonable(v):
  """Floats with NaN/inf as ``None``, NumPy scalars and arrays as Python values."""
  if isinstance(v, dict):
    return {str(k): jsonable(a) for k, a in v.items()}
  if isinstance(v, (list, tuple)):
    return [jsonable(a) for a in v]
  if isinstance(v, np.ndarray):
    return jsonable(v.tolist())
  if isinstance(v, (np.floating, float)):
    return float(v) if math.isfinite(float(v)) else None
  if isinstance(v, (np.integer,)):
    return int(v)
  if isinstance(v, np.bool_):
    return bool(v)
  return v


def describe(values) -> dict:
  """``{n, n_finite, median, mean, std, min, max}`` of a list of numbers; non-finite values are counted, not hidden."""
  a = np.asarray([np.nan if v is None else v for v in values], np.float64)
  fin = a[np.isfinite(a)]
  out = {"n": int(a.size), "n_finite": int(fin.size)}
  for name, fn in (("median", np.median), ("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
    out[name] = float(fn(fin)) if fin.size else None
  return out


# --- the run directory -------------------------------------------------------------------------------------------


def provenance(command: str = "") -> dict:
  """Versions, devices, date and command line of this process."""
  import flax
  import jax

  import peel_jax

  dev = jax.devices()
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": command,
      "python": sys.version.split()[0], "jax": jax.__version__, "flax": flax.__version__,
      "numpy": np.__version__, "peel_jax": peel_jax.__version__,
      "backend": jax.default_backend(), "devices": len(dev), "device_kind": dev[0].device_kind,
      "processes": jax.process_count(),
  }


class Run:
  """An output directory that keeps finished work (see the module docstring).

  Args:
    out: the output directory.
    config: the experiment's config dataclass; its dict (``out`` left out) decides whether a rerun may resume.
    overwrite: replace a directory that holds another config's results (or anything else).
    stop_after: raise :class:`Stopped` once this many units have been saved by this process (testing, and runs cut
      into pieces on purpose).
    command: the command line, recorded in ``config.json``.
    log: where progress lines go.

  Raises:
    BadConfig: the directory holds other results and ``overwrite`` is false, or is not a directory.
  """

  def __init__(self, out: str, config, *, overwrite: bool = False, stop_after: int | None = None,
               command: str = "", log: Callable[[str], None] | None = None):
    import jax

    self.out = os.path.abspath(out)
    self.parts = os.path.join(self.out, PARTS)
    self.config = config
    self._cfg = {k: v for k, v in config_dict(config).items() if k != "out"}
    self.stop_after = stop_after
    self.saved = 0
    self.computed: list[str] = []
    self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    self.process, self.processes = jax.process_index(), jax.process_count()
    if os.path.exists(self.out) and not os.path.isdir(self.out):
      raise BadConfig(f"--out {out!r} exists and is not a directory")
    parent = os.path.dirname(self.out)
    if not os.path.isdir(parent):
      raise BadConfig(f"parent directory of --out does not exist: {parent}")
    cfg_path = os.path.join(self.out, "config.json")
    if os.path.isdir(self.out) and os.listdir(self.out):
      previous = None
      if os.path.exists(cfg_path):
        with open(cfg_path) as f:
          previous = json.load(f).get("config")
      if previous == self._cfg:
        done = len([p for p in os.listdir(self.parts) if p.endswith(".json")]) if os.path.isdir(self.parts) else 0
        self.log(f"resuming in {self.out}: {done} unit(s) already done")
      elif not overwrite:
        if previous is None:
          raise BadConfig(f"output directory {out!r} holds other files; pass --overwrite to replace them")
        diff = sorted(k for k in set(previous) | set(self._cfg) if previous.get(k) != self._cfg.get(k))
        raise BadConfig(f"output directory {out!r} holds results of another config (differs in: {', '.join(diff)});"
                        " pass --overwrite to replace them, or choose another --out")
      elif self.process == 0:
        self.log(f"--overwrite: removing the earlier results in {self.out}")
        shutil.rmtree(self.out)
    if self.process == 0:
      os.makedirs(self.parts, exist_ok=True)
      write_json(cfg_path, {"config": self._cfg, "provenance": provenance(command)})
    _barrier("peel_jax_run_start")

  # --- units --------------------------------------------------------------------------------------------------
  def _part(self, unit: str, ext: str) -> str:
    return os.path.join(self.parts, f"{unit}.{ext}")

  def done(self, unit: str) -> bool:
    return os.path.exists(self._part(unit, "json"))

  def mine(self, units: Sequence[str]) -> list[str]:
    """The units this process computes (round-robin over processes) that are not done yet."""
    return [u for i, u in enumerate(units) if i % self.processes == self.process and not self.done(u)]

  def save(self, unit: str, rows: list[dict], arrays: dict[str, np.ndarray] | None = None,
           extra: dict | None = None) -> None:
    """Saves one finished unit atomically: arrays first, the row file last (its presence marks the unit done)."""
    if "/" in unit or unit.startswith("."):
      raise ValueError(f"bad unit id {unit!r}")
    if arrays:
      def w(tmp):
        with open(tmp, "wb") as f:
          np.savez_compressed(f, **arrays)

      atomic_write(self._part(unit, "npz"), w)
    write_json(self._part(unit, "json"), {"unit": unit, "rows": jsonable(rows), "extra": jsonable(extra or {})})
    self.saved += 1
    self.computed.append(unit)
    if self.stop_after is not None and self.saved >= self.stop_after:
      raise Stopped(f"stopped after {self.saved} unit(s) (--stop-after); rerun the same command to resume")

  def load(self, unit: str) -> dict:
    with open(self._part(unit, "json")) as f:
      return json.load(f)

  def arrays(self, unit: str) -> dict[str, np.ndarray]:
    path = self._part(unit, "npz")
    if not os.path.exists(path):
      return {}
    with np.load(path) as z:
      return {k: z[k] for k in z.files}

  def collect(self, units: Sequence[str]) -> list[dict]:
    """All rows of ``units`` (every unit must be done), in unit order. Waits for the other processes first."""
    _barrier("peel_jax_run_collect")
    missing = [u for u in units if not self.done(u)]
    if missing:
      raise RuntimeError(f"{len(missing)} unit(s) not done: {missing[:5]}")
    rows = []
    for u in units:
      rows += self.load(u)["rows"]
    return rows

  @property
  def writer(self) -> bool:
    """Only process 0 writes the tables and figures."""
    return self.process == 0

  def path(self, name: str) -> str:
    return os.path.join(self.out, name)


def _barrier(name: str) -> None:
  import jax

  if jax.process_count() > 1:  # pragma: no cover - multi-host only
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


# --- devices --------------------------------------------------------------------------------------------------------


def maybe_initialize_distributed(enabled: bool) -> None:
  """``jax.distributed.initialize()`` when asked (it reads the cluster from the environment on TPU/SLURM/...)."""
  if enabled:  # pragma: no cover - needs a multi-process cluster
    import jax

    jax.distributed.initialize()


def batch_mesh():
  """A one-axis mesh ``('batch',)`` over this process's devices."""
  import jax
  from jax.sharding import Mesh

  return Mesh(np.asarray(jax.local_devices()), ("batch",))


def shard_batch(x, mesh=None):
  """``(x_sharded, n)``: ``x`` ``(N, ...)`` padded with copies of its last image to a multiple of the device count
  and placed with its leading axis split over the mesh axis ``'batch'`` (unchanged on one device)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  mesh = batch_mesh() if mesh is None else mesh
  n = int(x.shape[0])
  d = mesh.devices.size
  if d == 1:
    return jnp.asarray(x), n
  pad = (-n) % d
  if pad:
    x = np.concatenate([np.asarray(x), np.repeat(np.asarray(x)[-1:], pad, axis=0)])
  return jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch"))), n


def batches(n: int, size: int) -> list[tuple[int, int]]:
  """``[(start, stop), ...]`` covering ``range(n)`` in chunks of ``size``."""
  if size < 1:
    raise ValueError(f"batch size must be >= 1, got {size}")
  return [(i, min(i + size, n)) for i in range(0, n, size)]


# --- entry point ------------------------------------------------------------------------------------------------------


def main(cls, run_fn: Callable, argv: Sequence[str] | None, description: str) -> int:
  """Parses the command line into ``cls``, runs ``run_fn(config, run)``, maps user errors to exit status 2 and
  ``--stop-after`` to exit status 3. Returns the exit status."""
  try:
    config, options = parse_config(cls, argv, description)
    maybe_initialize_distributed(options["distributed"])
    args = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "-m", module_name(cls), *args])
    run = Run(config.out, config, overwrite=options["overwrite"], stop_after=options["stop_after"], command=command)
    t0 = time.perf_counter()
    run_fn(config, run)
  except BadConfig as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except Stopped as e:
    print(str(e), file=sys.stderr)
    return EXIT_STOPPED
  print(f"done in {time.perf_counter() - t0:.0f} s: {run.out}", file=sys.stderr)
  return 0


def progress(items: Iterable, total: int, desc: str):
  """tqdm on a terminal, a line per item otherwise."""
  if sys.stderr.isatty():
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, file=sys.stderr)
    return
  for i, item in enumerate(items):
    print(f"{desc}: {i + 1}/{total}", file=sys.stderr, flush=True)
    yield item
