"""The PEEL authors' at-scale block solver exactly as the paper ran it: eager PyTorch, beside our JAX port and ours.

    python -m benchmarks.authors_torch [--quick] [--out benchmarks/results/authors_torch.json]

The paper (arXiv 2504.06410, Sec. 5) inverts real ResNet blocks by moving every constraint of the lifted problem
into a fixed quadratic penalty,

    min_{x,p,n}  || x + A2(p) - y ||^2 + mu * ( || A1(x) - (p - n) ||^2 + || p * n ||^2 ),

``mu = 1e2``, ``torch.optim.Adam(lr=0.01)`` for 1000 steps, ``p.clamp_(min=0)`` and ``n.clamp_(min=0)`` under
``torch.no_grad()`` after every step, every variable initialised at ``1e-3 * torch.randn``, one image at a time, in
float32 on the CPU. This module runs exactly that loop, eagerly, on the paper block ``y = x + A2(relu(A1 x))`` of
``peel_jax.zoo.block_problem('paper', ...)`` rebuilt in torch (kernel HWIO -> OIHW, padding ``k // 2``,
NHWC -> NCHW, as :mod:`benchmarks.pygranso_reference`), after checking that the torch block reproduces the zoo's
``y``. In the same process and on the same image it runs our JAX port of the same method
(:func:`peel_jax.baselines.authors_penalty`, default ``'python'`` driver) and our solver
(:func:`peel_jax.invert_block`, default config).

Problems: toy (5 channels, 8x8) and 64 channels at 16x16 and 56x56, each at ``branch_gain`` 1.0 and 0.3, seed 0,
the first image of ``block_problem(..., n=8)`` (the batch-1 rows of :mod:`benchmarks.block_solver`).

Timing (seconds per image, steady state): for torch, one warm-up solve from a different seed (``torch.manual_seed(1)``)
and then the timed solve (``torch.manual_seed(0)``); for the JAX port, a warm-up call with ``key(1)`` (compile + run)
and then the timed call with ``key(0)``; for ours, a warm-up call and then the timed call. ``torch.set_num_threads``
is left at its default unless ``--torch-threads`` sets it (both recorded); when it is set, every problem also times
``--probe-steps`` steps of the torch loop at the default thread count, because on a loaded machine (other processes
on every core) OpenMP's barriers made the default thread count tens of times slower per step than one thread. The
warm-up solves of both implementations of the authors' method are kept as a second random start each, so the two
can be compared in distribution (they share the formulation but not the random starts, so they never agree
bitwise). On the problems up to ``--same-start-max-size`` the torch loop is also run once
(untimed) from the JAX port's own ``key(0)`` start, which separates formulation differences from start differences.

Metrics, all computed with the torch block in float64 from the float32 estimates: relative input error
``||x_hat - x|| / ||x||``, relative residual ``||block(x_hat) - y|| / ||y||``, and the paper's toy metric
``100 * ||x - x_hat|| / numel(x)`` (its "1.14%"; not a relative error).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F

import peel_jax
from benchmarks import block_solver
from peel_jax import zoo
from peel_jax.baselines import authors as _authors
from peel_jax.baselines import authors_penalty

PROBLEMS = (("toy", 5, 8), ("c64/s16", 64, 16), ("c64/s56", 64, 56))
GAINS = (1.0, 0.3)
BATCH = 8  # the problem is block_problem(..., n=BATCH); image 0 is solved (block_solver's batch-1 rows)
STEPS, LR, PENALTY, INIT_SCALE = 1000, 0.01, 1e2, 1e-3
QUICK_STEPS = 50
# |y_torch - y_zoo| / |y_zoo| above this means the torch rebuild is not the zoo block: refuse to run.
PORT_TOL = 1e-5
METHODS = ("authors_torch", "authors_jax", "ours")


# --- the block in torch ----------------------------------------------------------------------------------------------


class TorchPaperBlock:
  """The zoo's paper block ``y = x + A2(relu(A1 x))`` in torch (NCHW, OIHW), in one dtype.

  Args:
    block: a :class:`peel_jax.blocks.Block` of ``block_problem('paper', ...)``.
    dtype: the torch dtype of the weights (and of the inputs the block expects).

  Raises:
    ValueError: if ``block`` is not the identity paper block (two stride-1 convolutions, identity shortcut, no
      post-add activation, ReLU).
  """

  def __init__(self, block, dtype=torch.float32):
    s = block.spec
    if (s.kind != "basic" or len(s.kernels) != 2 or s.shortcut != "identity" or s.post_activation
        or s.activation != "relu" or tuple(s.strides) != (1, 1) or tuple(s.groups) != (1, 1)):
      raise ValueError(f"TorchPaperBlock rebuilds only the identity paper block; got spec {s}")
    self.dtype = dtype
    c1, c2 = block.params["convs"]
    w = lambda a: torch.from_numpy(np.array(a, np.float32)).to(dtype).permute(3, 2, 0, 1).contiguous()
    b = lambda a: torch.from_numpy(np.array(a, np.float32)).to(dtype)
    self.w1, self.b1, self.w2, self.b2 = w(c1["kernel"]), b(c1["bias"]), w(c2["kernel"]), b(c2["bias"])
    self.pad1, self.pad2 = self.w1.shape[-1] // 2, self.w2.shape[-1] // 2

  def a1(self, v: torch.Tensor) -> torch.Tensor:
    return F.conv2d(v, self.w1, self.b1, padding=self.pad1)

  def a2(self, v: torch.Tensor) -> torch.Tensor:
    return F.conv2d(v, self.w2, self.b2, padding=self.pad2)

  def __call__(self, x: torch.Tensor) -> torch.Tensor:
    return x + self.a2(torch.relu(self.a1(x)))


def to_nchw(a, dtype=torch.float32) -> torch.Tensor:
  """An NHWC array (JAX or numpy) as a contiguous NCHW torch tensor."""
  return torch.from_numpy(np.array(a, np.float32)).to(dtype).permute(0, 3, 1, 2).contiguous()


def port_check(tblock: TorchPaperBlock, x, y) -> float:
  """``||tblock(x) - y|| / ||y||`` for NHWC ``x, y`` from the zoo (float32 torch block vs the zoo's float32 y)."""
  with torch.no_grad():
    yt = to_nchw(y, tblock.dtype)
    return float((tblock(to_nchw(x, tblock.dtype)) - yt).norm() / yt.norm())


# --- the authors' method, as the paper ran it ------------------------------------------------------------------------


def authors_torch(tblock: TorchPaperBlock, y: torch.Tensor, *, steps: int = STEPS, lr: float = LR,
                  penalty: float = PENALTY, init_scale: float = INIT_SCALE, seed: int | None = 0,
                  start: tuple | None = None) -> torch.Tensor:
  """The authors' fixed-penalty + Adam loop on one image, eagerly.

  Args:
    tblock: the block in torch.
    y: the observed output, ``(1, C, H, W)``.
    steps, lr, penalty, init_scale: Adam steps, learning rate, penalty ``mu``, init scale (the paper's values).
    seed: ``torch.manual_seed`` before the ``init_scale * torch.randn`` start (ignored when ``start`` is given).
    start: optional ``(x, p, n)`` NCHW tensors to start from instead (the same-start check).

  Returns:
    ``x_hat`` ``(1, C, H, W)``, detached.
  """
  if y.ndim != 4 or y.shape[0] != 1:
    raise ValueError(f"y must be one image (1, C, H, W), got shape {tuple(y.shape)}")
  if start is None:
    torch.manual_seed(seed)
    x = (init_scale * torch.randn(y.shape, dtype=y.dtype)).requires_grad_()
    p = (init_scale * torch.randn(y.shape, dtype=y.dtype)).requires_grad_()
    n = (init_scale * torch.randn(y.shape, dtype=y.dtype)).requires_grad_()
  else:
    x, p, n = (s.detach().clone().to(y.dtype).requires_grad_() for s in start)
  opt = torch.optim.Adam([x, p, n], lr=lr)
  for _ in range(steps):
    opt.zero_grad()
    fit = torch.sum((x + tblock.a2(p) - y) ** 2)
    pen = torch.sum((tblock.a1(x) - (p - n)) ** 2) + torch.sum((p * n) ** 2)
    loss = fit + penalty * pen
    loss.backward()
    opt.step()
    with torch.no_grad():
      p.clamp_(min=0)
      n.clamp_(min=0)
  return x.detach()


def jax_start(block, y, key) -> tuple:
  """The JAX port's own start for ``authors_penalty(block, y, key=key)`` (batch 1), as NCHW torch tensors."""
  v = _authors.start(block, y, jax.random.split(key, y.shape[0]), INIT_SCALE)
  return to_nchw(v["x"]), to_nchw(v["p"][0]), to_nchw(v["n"][0])


# --- metrics ----------------------------------------------------------------------------------------------------------


def metrics(tblock64: TorchPaperBlock, x_hat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict:
  """Relative input error, relative residual and the paper's % metric, in float64 (all NCHW)."""
  x_hat, x, y = (t.to(torch.float64) for t in (x_hat, x, y))
  with torch.no_grad():
    diff = x_hat - x
    return {
        "rel_error": float(diff.norm() / x.norm()),
        "residual": float((tblock64(x_hat) - y).norm() / y.norm()),
        "paper_pct": float(100.0 * diff.norm() / diff.numel()),
        "finite": bool(torch.isfinite(x_hat).all()),
    }


# --- the run ----------------------------------------------------------------------------------------------------------


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t0


def probe_default_threads(tblock: TorchPaperBlock, y: torch.Tensor, threads: int, steps: int) -> dict:
  """Seconds per Adam step of the torch loop at ``threads`` (after 5 untimed steps), then restores the setting.

  Records what the timed solves would cost at torch's default thread count when they run at another one (see
  ``--torch-threads``): on a loaded machine OpenMP's barriers make the default far slower.
  """
  before = torch.get_num_threads()
  torch.set_num_threads(threads)
  try:
    authors_torch(tblock, y, steps=5, seed=2)
    _, secs = _timed(lambda: authors_torch(tblock, y, steps=steps, seed=2))
  finally:
    torch.set_num_threads(before)
  return {"torch_num_threads": threads, "steps": steps, "seconds_per_step": secs / steps,
          "load_1min": os.getloadavg()[0]}


def run_problem(label: str, channels: int, size: int, gain: float, steps: int, same_start: bool,
                probe: tuple | None = None, log=print) -> list[dict]:
  """The three methods on image 0 of one zoo problem; one row per method.

  Args:
    label, channels, size, gain: the zoo problem.
    steps: Adam steps of the authors' method (both implementations).
    same_start: also run the untimed same-start check (torch from the JAX port's start).
    probe: ``(threads, steps)``: also time ``steps`` torch steps at ``threads`` (:func:`probe_default_threads`).
    log: where the rows are printed.
  """
  prob = zoo.block_problem("paper", channels=channels, size=size, n=BATCH, branch_gain=gain, seed=0)
  block, x, y = prob.block, prob.x[:1], prob.y[:1]
  tblock, tblock64 = TorchPaperBlock(block), TorchPaperBlock(block, torch.float64)
  port_err = port_check(tblock, x, y)
  if not port_err <= PORT_TOL:
    raise RuntimeError(f"{prob.name}: the torch block does not reproduce the zoo's y (relative error {port_err:.2e} "
                       f"> {PORT_TOL:.0e}); the rebuild (HWIO->OIHW, padding, NHWC->NCHW) is wrong")
  xt, yt = to_nchw(x), to_nchw(y)
  base = {"problem": label, "name": prob.name, "channels": channels, "size": size, "branch_gain": gain, "batch": 1,
          "image": 0, "port_check_residual": port_err}
  rows = []

  # The authors' method in eager torch: warm-up from seed 1, timed from seed 0.
  warm_x, warm_s = _timed(lambda: authors_torch(tblock, yt, steps=steps, seed=1))
  x_hat, secs = _timed(lambda: authors_torch(tblock, yt, steps=steps, seed=0))
  row = {**base, "method": "authors_torch", "steps": steps, "seconds_per_image": secs, "warmup_s": warm_s,
         "torch_num_threads": torch.get_num_threads(),
         "start": "1e-3*torch.randn, torch.manual_seed(0)", **metrics(tblock64, x_hat, xt, yt),
         "warmup_start": {"start": "torch.manual_seed(1)", **metrics(tblock64, warm_x, xt, yt)}}
  if same_start:  # untimed: torch from the JAX port's key(0) start
    xs = authors_torch(tblock, yt, steps=steps, start=jax_start(block, y, jax.random.key(0)))
    row["same_start_as_jax"] = metrics(tblock64, xs, xt, yt)
    row["same_start_x_hat"] = xs
  if probe is not None:
    row["default_threads_probe"] = probe_default_threads(tblock, yt, *probe)
  rows.append(row)

  # Our JAX port of the same method (python driver, batch 1): warm-up with key(1), timed with key(0).
  def port(k):
    xh, _ = authors_penalty(block, y, key=jax.random.key(k), steps=steps)
    return jax.block_until_ready(xh)

  warm_j, warm_js = _timed(lambda: port(1))
  xj, secs = _timed(lambda: port(0))
  row = {**base, "method": "authors_jax", "steps": steps, "seconds_per_image": secs, "warmup_s": warm_js,
         "start": "1e-3*jax.random.normal, key(0)", **metrics(tblock64, to_nchw(xj), xt, yt),
         "warmup_start": {"start": "key(1)", **metrics(tblock64, to_nchw(warm_j), xt, yt)}}
  rows.append(row)
  if same_start:
    xs = rows[0].pop("same_start_x_hat")
    d = (xs.to(torch.float64) - to_nchw(xj, torch.float64)).norm() / xt.to(torch.float64).norm()
    rows[0]["same_start_as_jax"]["x_hat_diff_vs_jax_rel"] = float(d)

  # Ours, default config: warm-up (compile + run), then timed.
  def ours():
    xh, info = peel_jax.invert_block(block, y)
    return jax.block_until_ready(xh), info

  _, warm_os = _timed(ours)
  (xo, info), secs = _timed(ours)
  rows.append({**base, "method": "ours", "seconds_per_image": secs, "warmup_s": warm_os,
               "iterations": int(np.asarray(info.iterations)[0]), "converged": bool(np.asarray(info.converged)[0]),
               **metrics(tblock64, to_nchw(xo), xt, yt)})
  for r in rows:
    r["load_1min"] = os.getloadavg()[0]
    log(format_row(r))
  return rows


HEADER = (f"{'problem':<8} {'gain':>4} {'method':<13} {'s/img':>8} {'rel err':>8} {'residual':>8} {'paper%':>8} "
          f"{'2nd start err':>13}")


def format_row(r: dict) -> str:
  second = r.get("warmup_start", {}).get("rel_error")
  probe = r.get("default_threads_probe")
  note = "" if probe is None else (f"  [{probe['torch_num_threads']} threads: {probe['seconds_per_step']:.3g} s/step, "
                                   f"x{r['steps']} = {probe['seconds_per_step'] * r['steps']:.3g} s]")
  return (f"{r['problem']:<8} {r['branch_gain']:>4.1f} {r['method']:<13} {r['seconds_per_image']:>8.3g} "
          f"{r['rel_error']:>8.2e} {r['residual']:>8.2e} {r['paper_pct']:>8.3g} "
          f"{'' if second is None else f'{second:.2e}':>13}{note}")


def markdown_table(rows: list[dict]) -> str:
  head = "| problem | gain | method | s/image | rel input error | rel residual | paper % |"
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(f"| {r['problem']} | {r['branch_gain']:.1f} | {r['method']} | {r['seconds_per_image']:.3g} "
                 f"| {r['rel_error']:.2e} | {r['residual']:.2e} | {r['paper_pct']:.3g} |")
  return "\n".join(lines)


def ratios(rows: list[dict]) -> list[dict]:
  """Per problem: torch eager / JAX port (time), torch eager / ours (time) and torch / ours (input error)."""
  out = []
  keys = list(dict.fromkeys((r["problem"], r["branch_gain"]) for r in rows))  # run order
  for prob, gain in keys:
    by = {r["method"]: r for r in rows if r["problem"] == prob and r["branch_gain"] == gain}
    if not all(m in by for m in METHODS):
      continue
    t, j, o = by["authors_torch"], by["authors_jax"], by["ours"]
    out.append({
        "problem": prob, "branch_gain": gain,
        "time_torch_over_jax_port": t["seconds_per_image"] / j["seconds_per_image"],
        "time_torch_over_ours": t["seconds_per_image"] / o["seconds_per_image"],
        "error_torch_over_ours": t["rel_error"] / max(o["rel_error"], 1e-30),
        "error_torch_over_jax_port": t["rel_error"] / max(j["rel_error"], 1e-30),
    })
  return out


def _versions() -> dict:
  import jaxlib
  import optax

  return {"python": platform.python_version(), "torch": torch.__version__, "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "optax": optax.__version__, "numpy": np.__version__,
          "peel_jax": peel_jax.__version__}


def metadata(argv: list[str], steps: int, quick: bool) -> dict:
  return {
      "command": "python -m benchmarks.authors_torch" + "".join(f" {a}" for a in argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "cpu_model": block_solver.cpu_model(), "cpu_count": os.cpu_count(),
      "load_average_start": list(os.getloadavg()),
      "versions": _versions(),
      "threads": {"torch_num_threads": torch.get_num_threads(),
                  "torch_num_interop_threads": torch.get_num_interop_threads(),
                  "jax_devices": [str(d) for d in jax.devices()],
                  "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
                  "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")},
      "authors_method": {"steps": steps, "lr": LR, "penalty": PENALTY, "init_scale": INIT_SCALE,
                         "optimizer": "torch.optim.Adam (defaults otherwise) / optax.adam",
                         "dtype": "float32", "batch": 1},
      "ours_config": "peel_jax.SolverConfig() (default)",
      "problems": "zoo.block_problem('paper', channels, size, n=8, branch_gain, seed=0), image 0",
      "metrics": "torch block in float64 from float32 estimates",
      "quick": quick,
  }


def parse_args(argv):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.authors_torch", description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help=f"toy only, {QUICK_STEPS} steps (smoke test)")
  ap.add_argument("--out", default="benchmarks/results/authors_torch.json", help="JSON output path")
  ap.add_argument("--torch-threads", type=int, default=None,
                  help="torch.set_num_threads for the timed torch solves (default: leave torch's default); when set, "
                       "a short probe still times the loop at the default thread count")
  ap.add_argument("--probe-steps", type=int, default=20, help="steps of that probe")
  ap.add_argument("--same-start-max-size", type=int, default=16,
                  help="run the untimed same-start check (torch from the JAX port's start) up to this size")
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  problems = PROBLEMS[:1] if args.quick else PROBLEMS
  steps = QUICK_STEPS if args.quick else STEPS
  default_threads = torch.get_num_threads()
  if args.torch_threads is not None and args.torch_threads < 1:
    raise SystemExit(f"--torch-threads must be >= 1, got {args.torch_threads}")
  probe = None
  if args.torch_threads is not None and args.torch_threads != default_threads:
    probe = (default_threads, min(args.probe_steps, steps))
    torch.set_num_threads(args.torch_threads)
  try:
    return _main(argv, args, steps, problems, default_threads, probe)
  finally:
    torch.set_num_threads(default_threads)


def _main(argv, args, steps, problems, default_threads, probe) -> dict:
  meta = metadata(argv, steps, args.quick)
  meta["threads"]["torch_default_num_threads"] = default_threads
  print(f"# {meta['command']}\n# {meta['date']}  {meta['cpu_model']} x{meta['cpu_count']}  torch "
        f"{meta['versions']['torch']} ({meta['threads']['torch_num_threads']} threads)  jax {meta['versions']['jax']}"
        f"  load {meta['load_average_start']}", flush=True)
  print(HEADER)
  t0 = time.perf_counter()
  rows = []
  for label, channels, size in problems:
    for gain in GAINS:
      rows += run_problem(label, channels, size, gain, steps, same_start=size <= args.same_start_max_size,
                          probe=probe)
  meta["total_wall_s"] = time.perf_counter() - t0
  meta["load_average_end"] = list(os.getloadavg())
  result = {"meta": meta, "rows": rows, "ratios": ratios(rows)}
  for q in result["ratios"]:
    print(f"{q['problem']:<8} {q['branch_gain']:>4.1f}  time torch/jax-port {q['time_torch_over_jax_port']:.2f}  "
          f"time torch/ours {q['time_torch_over_ours']:.1f}  error torch/ours {q['error_torch_over_ours']:.2g}")
  print(f"# total {meta['total_wall_s']:.0f} s; load average at end {meta['load_average_end']}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"# wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
