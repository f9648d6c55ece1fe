"""Optional PyGRANSO reference: the paper's own solver on the paper's own formulation of one block.

Two steps, two Python environments (PyGRANSO pins numpy 1.x and imports ``gurobipy``; it must never enter the
project's venv):

    # 1. with the project's venv: write the zoo toy problems (weights, true inputs, outputs) to an .npz
    .venv/bin/python -m benchmarks.pygranso_reference export --out benchmarks/results/pygranso_problems.npz

    # 2. with a separate venv holding pygranso==1.2.0 (see below): solve them, write JSON
    /tmp/pg/bin/python benchmarks/pygranso_reference.py solve \\
        --problems benchmarks/results/pygranso_problems.npz --out benchmarks/results/pygranso.json --maxclocktime 150

    # the separate venv (DESIGN.md section 5):
    python3 -m venv /tmp/pg
    /tmp/pg/bin/pip install torch==2.13.0 numpy==1.26.4 scipy==1.11.4 osqp==0.6.7.post3
    /tmp/pg/bin/pip install --no-deps pygranso==1.2.0 gurobipy   # imported unconditionally; OSQP does the solving

The problems are exactly ``peel_jax.zoo.block_problem('paper', channels=5, size=8, n=1, branch_gain=g)`` for
``g`` in (1.0, 0.3): the paper block ``y = x + A2(relu(A1 x))``. The solve step needs only torch and numpy: the two
convolutions are rebuilt in torch from the exported weights (kernel HWIO -> OIHW, padding 1, NHWC -> NCHW) and
checked against the exported ``y`` before solving.

Formulation (the paper's, solved as the paper did, with PyGRANSO's default options otherwise):

    variables  x, p, n  (each C x H x W)
    minimise   || y - x - A2(p) ||^2
    subject to -p <= 0,  -n <= 0                      (inequalities)
               A1(x) - p + n = 0,  p * n = 0          (equalities, elementwise)

in double precision, from ``x0 = 1e-3 N(0, I)`` for every variable (the start the authors' at-scale method uses,
:mod:`peel_jax.baselines.authors`; PyGRANSO's own default is ``N(0, I)``), capped by ``opts.maxit`` and the
wall-clock cap ``opts.maxclocktime``. Full BFGS when the inverse Hessian (``nvar^2`` doubles) fits comfortably,
limited-memory BFGS (``opts.limited_mem_size``) otherwise. Reported: relative input error ``||x_hat - x|| / ||x||``,
relative residual ``||block(x_hat) - y|| / ||y||`` (of the final iterate, and the error-vs-time trace of every
iterate via ``opts.halt_log_fn``), iterations, wall time, PyGRANSO's termination code.

Why only toy sizes: PyGRANSO forms the constraint Jacobians densely (``n_constraints x n_vars`` doubles, built one
autograd backward per constraint) and, with full BFGS, an ``n_vars x n_vars`` inverse Hessian; see
:func:`memory_estimate` (written into the JSON for the 64-channel blocks of ``benchmarks/block_solver.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

GAINS = (1.0, 0.3)
TOY = dict(channels=5, size=8)
# Full BFGS while the dense inverse Hessian stays under this many bytes; limited-memory beyond.
FULL_BFGS_MAX_BYTES = 2 * 2**30
LIMITED_MEM_SIZE = 20

MISSING_MESSAGE = (
    "pygranso is not installed in this Python ({exe}). The PyGRANSO reference runs in a separate virtual environment "
    "(it pins numpy 1.x and imports gurobipy); keep it out of the project's venv:\n"
    "  python3 -m venv /tmp/pg\n"
    "  /tmp/pg/bin/pip install torch==2.13.0 numpy==1.26.4 scipy==1.11.4 osqp==0.6.7.post3\n"
    "  /tmp/pg/bin/pip install --no-deps pygranso==1.2.0 gurobipy\n"
    "  /tmp/pg/bin/python benchmarks/pygranso_reference.py solve --problems ... --out ...\n"
    "(original error: {err})"
)


class PyGRANSOMissing(ImportError):
  """Raised with install instructions when pygranso (or torch) cannot be imported."""


def import_pygranso():
  """``(pygranso, pygransoStruct, torch)``, or :class:`PyGRANSOMissing` with instructions."""
  try:
    import torch
    from pygranso.pygranso import pygranso
    from pygranso.pygransoStruct import pygransoStruct
  except ImportError as e:  # includes a missing gurobipy, which pygranso imports unconditionally
    raise PyGRANSOMissing(MISSING_MESSAGE.format(exe=sys.executable, err=e)) from e
  return pygranso, pygransoStruct, torch


# --- memory model ------------------------------------------------------------------------------------------------


def memory_estimate(channels: int, size: int, batch: int = 1) -> dict:
  """Bytes PyGRANSO's dense float64 objects need for one paper block (``batch`` images solved jointly)."""
  m = batch * channels * size * size  # elements of x (= of p, of n, of A1 x)
  nvar = 3 * m
  n_ci, n_ce = 2 * m, 2 * m  # -p, -n ; A1 x - p + n, p * n
  jac = (n_ci + n_ce) * nvar * 8
  hess = nvar * nvar * 8
  return {
      "channels": channels, "size": size, "batch": batch, "n_vars": nvar, "n_inequalities": n_ci,
      "n_equalities": n_ce, "constraint_jacobians_bytes": jac, "full_bfgs_inverse_hessian_bytes": hess,
      "total_full_bfgs_gib": (jac + hess) / 2**30, "jacobians_only_gib": jac / 2**30,
      "autograd_backwards_per_iteration": n_ci + n_ce + 1,
  }


# --- export (project venv) ----------------------------------------------------------------------------------------


def export(out: str, gains=GAINS, channels: int = TOY["channels"], size: int = TOY["size"]) -> str:
  """Writes the zoo problems to ``out`` (.npz); needs peel_jax (run with the project's venv)."""
  from peel_jax import zoo

  arrays = {}
  for g in gains:
    prob = zoo.block_problem("paper", channels=channels, size=size, n=1, branch_gain=g)
    tag = f"g{g}"
    (c1, c2) = prob.block.params["convs"]
    arrays[f"{tag}/w1"] = np.asarray(c1["kernel"])
    arrays[f"{tag}/b1"] = np.asarray(c1["bias"])
    arrays[f"{tag}/w2"] = np.asarray(c2["kernel"])
    arrays[f"{tag}/b2"] = np.asarray(c2["bias"])
    arrays[f"{tag}/x"] = np.asarray(prob.x)
    arrays[f"{tag}/y"] = np.asarray(prob.y)
    arrays[f"{tag}/name"] = np.asarray(prob.name)
  arrays["gains"] = np.asarray(gains, np.float64)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **arrays)
  return out


# --- solve (pygranso venv) ---------------------------------------------------------------------------------------


def _torch_block(torch, data, tag):
  """``(A1, A2, x, y)`` in torch float64, NCHW, from the exported NHWC/HWIO arrays."""
  import torch.nn.functional as F

  t = lambda a: torch.as_tensor(np.asarray(a, np.float64))
  w1 = t(data[f"{tag}/w1"]).permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
  w2 = t(data[f"{tag}/w2"]).permute(3, 2, 0, 1).contiguous()
  b1, b2 = t(data[f"{tag}/b1"]), t(data[f"{tag}/b2"])
  k1, k2 = w1.shape[-1], w2.shape[-1]
  a1 = lambda v: F.conv2d(v, w1, b1, padding=k1 // 2)
  a2 = lambda v: F.conv2d(v, w2, b2, padding=k2 // 2)
  x = t(data[f"{tag}/x"]).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
  y = t(data[f"{tag}/y"]).permute(0, 3, 1, 2).contiguous()
  return a1, a2, x, y


def solve_one(data, tag: str, maxit: int, maxclocktime: float, seed: int = 0, print_level: int = 0) -> dict:
  pygranso, pygransoStruct, torch = import_pygranso()
  torch.manual_seed(seed)
  a1, a2, x_true, y = _torch_block(torch, data, tag)
  block = lambda v: v + a2(torch.relu(a1(v)))
  with torch.no_grad():
    port_err = float((block(x_true) - y).norm() / y.norm())  # float32 export vs float64 torch
  shape = list(x_true.shape)
  m = int(np.prod(shape))
  var_in = {"x": shape, "p": shape, "n": shape}

  def comb_fn(X):
    x, p, n = X.x, X.p, X.n
    f = torch.sum((y - x - a2(p)) ** 2)
    ci = pygransoStruct()
    ci.c1 = -p
    ci.c2 = -n
    ce = pygransoStruct()
    ce.c1 = a1(x) - p + n
    ce.c2 = p * n
    return f, ci, ce

  trace = []
  t_start = [None]

  def halt_log_fn(iteration, xvec, *rest):
    xv = xvec[:m].reshape(shape).detach()
    with torch.no_grad():
      err = float((xv - x_true).norm() / x_true.norm())
      res = float((block(xv) - y).norm() / y.norm())
    trace.append({"iteration": int(iteration), "seconds": time.perf_counter() - t_start[0], "rel_error": err,
                  "residual": res})
    return False

  opts = pygransoStruct()
  opts.torch_device = torch.device("cpu")
  opts.double_precision = True
  opts.x0 = 1e-3 * torch.randn(3 * m, 1, dtype=torch.double)
  opts.maxit = maxit
  opts.maxclocktime = maxclocktime
  opts.print_level = print_level
  opts.halt_log_fn = halt_log_fn
  mem = memory_estimate(shape[1], shape[2], shape[0])
  full = mem["full_bfgs_inverse_hessian_bytes"] <= FULL_BFGS_MAX_BYTES
  if not full:
    opts.limited_mem_size = LIMITED_MEM_SIZE
  t_start[0] = time.perf_counter()
  soln = pygranso(var_spec=var_in, combined_fn=comb_fn, user_opts=opts)
  wall = time.perf_counter() - t_start[0]
  xv = soln.final.x[:m].reshape(shape).detach()
  with torch.no_grad():
    err = float((xv - x_true).norm() / x_true.norm())
    res = float((block(xv) - y).norm() / y.norm())
    diff = (xv - x_true).reshape(-1)
    paper_pct = float(100.0 * diff.norm() / diff.numel())
  iters = int(soln.iters)
  try:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  except (ImportError, OSError):
    rss = None
  return {
      "problem": "toy", "name": str(data[f"{tag}/name"]), "branch_gain": float(tag[1:]), "batch": shape[0],
      "method": "pygranso", "rel_error": err, "residual": res, "paper_pct": paper_pct, "iterations": iters,
      "wall_s": wall, "seconds_per_iteration": wall / max(iters, 1), "termination_code": int(soln.termination_code),
      "final_f": float(soln.final.f), "final_tv": float(soln.final.tv), "bfgs": "full" if full else
      f"limited_mem_size={LIMITED_MEM_SIZE}", "maxit": maxit, "maxclocktime": maxclocktime, "x0": "1e-3*N(0,I)",
      "seed": seed, "port_check_residual": port_err, "max_rss_bytes": rss, "trace": trace,
  }


def solve(problems: str, out: str, maxit: int, maxclocktime: float, gains=None, print_level: int = 0) -> dict:
  _, _, torch = import_pygranso()
  import platform

  import pygranso as _pg

  data = np.load(problems)
  gains = tuple(float(g) for g in (gains or data["gains"]))
  import datetime

  meta = {
      "command": "python benchmarks/pygranso_reference.py " + " ".join(sys.argv[1:]),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
      "pygranso": getattr(_pg, "__version__", "1.2.0 (pinned)"), "torch_threads": torch.get_num_threads(),
      "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
      "formulation": "min ||y - x - A2 p||^2 s.t. -p<=0, -n<=0, A1 x - p + n = 0, p*n = 0 (float64)",
  }
  result = {"meta": meta, "rows": [],
            "memory_estimates": [memory_estimate(5, 8), memory_estimate(16, 16), memory_estimate(64, 16),
                                 memory_estimate(64, 56)]}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  for g in gains:
    row = solve_one(data, f"g{g}", maxit, maxclocktime, print_level=print_level)
    result["rows"].append(row)
    print(f"pygranso toy g={g}: rel err {row['rel_error']:.3g}  residual {row['residual']:.3g}  "
          f"iters {row['iterations']}  {row['wall_s']:.1f} s ({row['seconds_per_iteration']:.2f} s/iter)  "
          f"termination {row['termination_code']}  port check {row['port_check_residual']:.1e}", flush=True)
    meta["load_average_end"] = list(os.getloadavg())
    with open(out, "w") as f:  # after every problem, so a killed run keeps what it finished
      json.dump(result, f, indent=1)
  print(f"# wrote {out}")
  return result


def main(argv=None):
  ap = argparse.ArgumentParser(prog="benchmarks/pygranso_reference.py", description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  e = sub.add_parser("export", help="write the zoo toy problems to .npz (project venv)")
  e.add_argument("--out", default="benchmarks/results/pygranso_problems.npz")
  s = sub.add_parser("solve", help="solve them with PyGRANSO (separate venv)")
  s.add_argument("--problems", default="benchmarks/results/pygranso_problems.npz")
  s.add_argument("--out", default="benchmarks/results/pygranso.json")
  s.add_argument("--maxit", type=int, default=1000)
  s.add_argument("--maxclocktime", type=float, default=150.0, help="wall-clock cap per problem, seconds")
  s.add_argument("--gains", default=None, help="comma-separated subset of the exported gains")
  s.add_argument("--print-level", type=int, default=0)
  m = sub.add_parser("memory", help="print the dense-memory estimate for a block")
  m.add_argument("--channels", type=int, default=64)
  m.add_argument("--size", type=int, default=16)
  args = ap.parse_args(argv)
  if args.cmd == "export":
    print(f"# wrote {export(args.out)}")
  elif args.cmd == "memory":
    print(json.dumps(memory_estimate(args.channels, args.size), indent=1))
  else:
    gains = [float(g) for g in args.gains.split(",")] if args.gains else None
    try:
      solve(args.problems, args.out, args.maxit, args.maxclocktime, gains, args.print_level)
    except PyGRANSOMissing as err:
      raise SystemExit(str(err)) from None


if __name__ == "__main__":
  main()
