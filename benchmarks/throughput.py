"""Block-inversion throughput and roofline, in the style of Flax's examples/imagenet fake-data benchmark.

    python -m benchmarks.throughput [--quick] [--out benchmarks/results/throughput.json]
        [--kinds paper,basic,basic_down,bottleneck] [--sizes 16,32,56] [--batches 1,4,8] [--inners lm,adam]
        [--network | --network-only]

For one block of each zoo kind (``peel_jax.zoo.block_problem(kind, channels=64, ...)``: He-normal weights, inputs
ReLU features of a bundled photo), sweeping batch, resolution and the inner solver (``SolverConfig()``: the default
LM, which stops at convergence; ``SolverConfig(inner='adam', max_iters=ADAM_BUDGET)``: a fixed budget, its tol is
never reached), it measures:

- ``compile_s``: the first call (trace + compile + run) minus the steady-state call time (the CPU driver is a Python
  loop around jitted steps, so there is no single executable to compile ahead of time);
- steady state: the median of repeated calls (at least one; until ``--min-time`` s or ``--repeats`` calls):
  ``images_per_s`` and solver ``iters_per_s`` (batched iterations: one iteration advances every image; the driver
  runs until every image has converged or the budget is spent, so ``iterations_run`` is the batch maximum);
- quality: median relative input error ``||x_hat - x|| / ||x||`` and the converged fraction (``info.converged``;
  note ``basic_down`` is stride 2, its input is not determined by its output, so its input error is not expected to
  be small while its residual is);
- roofline: FLOPs per image per iteration, from a model count, and the achieved GFLOP/s against the measured peak
  (a jitted float32 ``jnp.dot`` of two ``PEAK_N x PEAK_N`` matrices, best of a few):
    block forward = sum over its convs (shortcut included) of ``2 * Ho * Wo * Cout * Cin * k * k / groups``;
    LM iteration  = (1 linearize forward + cg_iters * (1 JVP + 1 VJP) + 1 gradient-curvature JVP
                     + len(STEP_LADDER) trial forwards) forwards, with JVP ~ VJP ~ forward;
    Adam iteration = 1 forward + 1 VJP.
  The count leaves out the gradient VJP, CGLS's first VJP and the per-iteration residual/constraint evaluation
  (about 4 more forwards per LM iteration, ~9%) and all elementwise work: achieved GFLOP/s is a lower bound;
- ``max_rss_mb``: on CPU the *process* resident-set high-water mark (``resource.getrusage``), monotone over the
  run; not a per-row device-memory figure. On an accelerator, ``peak_bytes_in_use`` of the device is recorded too.

``--network`` adds whole-network rows (``peel_jax.invert_network``, paper-variant ResNet-18 with branches scaled
by 0.3, from ``layer1`` at 96x96, batch 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import peel_jax
from peel_jax import zoo
from peel_jax.solver import lm

KINDS = ("paper", "basic", "basic_down", "bottleneck")
ADAM_BUDGET = 300
PEAK_N = 2048
ROW_KEYS = (
    "kind", "channels", "size", "batch", "inner", "max_iters", "compile_s", "first_call_s", "steady_s",
    "timed_calls", "images_per_s", "iterations_run", "iterations_median", "iters_per_s", "rel_error_median",
    "residual_median", "converged_fraction", "forward_gflop", "gflop_per_iter", "achieved_gflops", "peak_gflops",
    "pct_of_peak", "max_rss_mb",
)


@dataclasses.dataclass(frozen=True)
class Plan:
  kinds: tuple
  channels: int
  sizes: tuple
  batches: tuple
  inners: tuple
  lm_config: peel_jax.SolverConfig
  adam_config: peel_jax.SolverConfig
  peak_n: int


FULL = Plan(
    kinds=KINDS, channels=64, sizes=(16, 32, 56), batches=(1, 4, 8), inners=("lm", "adam"),
    lm_config=peel_jax.SolverConfig(),
    adam_config=peel_jax.SolverConfig(inner="adam", max_iters=ADAM_BUDGET),
    peak_n=PEAK_N,
)

QUICK = Plan(
    kinds=KINDS, channels=16, sizes=(16,), batches=(2,), inners=("lm", "adam"),
    lm_config=peel_jax.SolverConfig(max_iters=3, cg_iters=4),
    adam_config=peel_jax.SolverConfig(inner="adam", max_iters=6),
    peak_n=512,
)


# --- FLOP model ----------------------------------------------------------------------------------------------------


def _conv_flops(kernel_shape, h_in: int, w_in: int, stride: int) -> tuple[float, int, int]:
  """``(flops, h_out, w_out)`` of one conv (``kernel (k, k, cin/groups, cout)``, padding ``k // 2``)."""
  k, _, cin_g, cout = kernel_shape
  pad = k // 2
  h_out = (h_in + 2 * pad - k) // stride + 1
  w_out = (w_in + 2 * pad - k) // stride + 1
  return 2.0 * h_out * w_out * cout * cin_g * k * k, h_out, w_out


def block_forward_flops(block, size: int) -> float:
  """Multiply-add FLOPs of one forward pass of ``block`` on a ``size x size`` input (one image)."""
  spec = block.spec
  h = w = size
  total = 0.0
  for conv, s in zip(block.params["convs"], spec.strides):
    f, h, w = _conv_flops(conv["kernel"].shape, h, w, s)
    total += f
  if "shortcut" in block.params:
    f, _, _ = _conv_flops(block.params["shortcut"]["kernel"].shape, size, size, spec.stride)
    total += f
  return total


def forwards_per_iteration(config: peel_jax.SolverConfig) -> int:
  """Forward-pass equivalents of one solver iteration (see the module docstring)."""
  if config.inner == "lm":
    return 1 + 2 * config.cg_iters + 1 + len(lm.STEP_LADDER)
  if config.inner == "adam":
    return 2
  raise ValueError(f"no FLOP model for inner {config.inner!r}")


def measure_peak_gflops(n: int = PEAK_N, tries: int = 5) -> float:
  """Best-of-``tries`` float32 matmul rate, GFLOP/s (``2 n^3`` FLOPs)."""
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(tries):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best / 1e9


# --- measurement -----------------------------------------------------------------------------------------------------


def _max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _device_peak_bytes():
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - CPU backends may not implement it
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def _timed(fn, repeats: int, min_time: float):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  while len(times) < max(1, repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
    if sum(times) >= min_time:
      break
  return out, first, float(np.median(times)), len(times)


def measure_block(kind: str, channels: int, size: int, batch: int, config: peel_jax.SolverConfig, peak: float,
                  repeats: int, min_time: float) -> dict:
  prob = zoo.block_problem(kind, channels=channels, size=size, n=batch)
  fn = lambda: peel_jax.invert_block(prob.block, prob.y, config=config)
  (x_hat, info), first, steady, calls = _timed(fn, repeats, min_time)
  err = np.asarray(peel_jax.relative_error(x_hat, prob.x), np.float64)
  res = np.asarray(peel_jax.relative_residual(prob.block, x_hat, prob.y), np.float64)
  iters = np.asarray(info.iterations)
  run_iters = int(iters.max())
  fwd = block_forward_flops(prob.block, size)
  per_iter = fwd * forwards_per_iteration(config)
  achieved = per_iter * batch * run_iters / steady / 1e9
  return {
      "kind": kind, "channels": channels, "size": size, "batch": batch, "inner": config.inner,
      "max_iters": config.max_iters, "cg_iters": config.cg_iters if config.inner == "lm" else None,
      "compile_s": max(first - steady, 0.0), "first_call_s": first, "steady_s": steady, "timed_calls": calls,
      "images_per_s": batch / steady, "iterations_run": run_iters, "iterations_median": float(np.median(iters)),
      "iters_per_s": run_iters / steady,
      "rel_error_median": float(np.median(err)), "residual_median": float(np.median(res)),
      "converged_fraction": float(np.mean(np.asarray(info.converged))),
      "forward_gflop": fwd / 1e9, "gflop_per_iter": per_iter / 1e9, "achieved_gflops": achieved,
      "peak_gflops": peak, "pct_of_peak": 100.0 * achieved / peak, "max_rss_mb": _max_rss_mb(),
      "device_peak_bytes": _device_peak_bytes(), "load_1min": os.getloadavg()[0],
  }


def measure_network(size: int = 96, batch: int = 1, gain: float = 0.3, layer: str = "layer1",
                    config: peel_jax.SolverConfig | None = None, arch: str = "resnet18",
                    variant: str = "paper") -> dict:
  """One whole-network row: ``peel_jax.invert_network`` on ``arch`` (``variant``: ``'paper'`` or ``'torchvision'``),
  random init with every branch's last affine map scaled by ``gain``, a bundled photo tiled ``batch`` times."""
  from peel_jax import images, models
  from peel_jax.cli import scale_branches

  img = jnp.asarray(images.normalize(images.bundled("astronaut", size)))[None]
  img = jnp.tile(img, (batch, 1, 1, 1))
  model = models.get_model(arch, **(models.paper_variant() if variant == "paper" else {}))
  variables = scale_branches(model.init(jax.random.key(0), img), gain)
  feats = peel_jax.features(model, variables, img)
  config = config or peel_jax.SolverConfig()
  fn = lambda: peel_jax.invert_network(model, variables, feats[layer], layer, image=img, config=config)
  (x_hat, report), first, steady, calls = _timed(fn, 1, 0.0)
  blocks = [b for b in report.blocks if b.name != "stem"]
  return {
      "network": f"{arch} ({variant} variant)", "branch_gain": gain, "layer": layer, "size": size, "batch": batch,
      "max_iters": config.max_iters, "blocks": len(blocks),
      "compile_s": max(first - steady, 0.0), "first_call_s": first, "steady_s": steady, "images_per_s": batch / steady,
      "block_iterations": int(sum(int(np.max(b.iterations)) for b in blocks)),
      "blocks_converged_fraction": float(np.mean([b.converged_fraction for b in blocks])) if blocks else None,
      "psnr_median": float(np.median(np.asarray(report.psnr))) if report.psnr is not None else None,
      "observation_residual_median": float(np.median(np.asarray(report.observation_residual))),
      "max_rss_mb": _max_rss_mb(), "load_1min": os.getloadavg()[0],
  }


# --- output -----------------------------------------------------------------------------------------------------------


HEADER = (f"{'kind':<10} {'size':>4} {'N':>2} {'inner':<5} {'compile':>7} {'img/s':>8} {'it/s':>7} {'iters':>5} "
          f"{'err med':>8} {'conv':>4} {'GF/it':>7} {'GF/s':>7} {'%peak':>6} {'RSS MB':>7}")


def format_row(r: dict) -> str:
  return (f"{r['kind']:<10} {r['size']:>4d} {r['batch']:>2d} {r['inner']:<5} {r['compile_s']:>7.2f} "
          f"{r['images_per_s']:>8.3g} {r['iters_per_s']:>7.3g} {r['iterations_run']:>5d} {r['rel_error_median']:>8.1e} "
          f"{r['converged_fraction']:>4.2f} {r['gflop_per_iter']:>7.3g} {r['achieved_gflops']:>7.3g} "
          f"{r['pct_of_peak']:>6.1f} {r['max_rss_mb']:>7.0f}")


def markdown_table(rows: list[dict]) -> str:
  head = ("| kind | size | N | inner | compile s | images/s | iters/s | iters | rel err med | converged "
          "| GFLOP/iter/img | achieved GFLOP/s | % of peak | max RSS MB |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
        f"| {r['kind']} | {r['size']} | {r['batch']} | {r['inner']} | {r['compile_s']:.1f} | {r['images_per_s']:.3g} "
        f"| {r['iters_per_s']:.3g} | {r['iterations_run']} | {r['rel_error_median']:.1e} | "
        f"{r['converged_fraction']:.2f} | {r['gflop_per_iter']:.3g} | {r['achieved_gflops']:.3g} "
        f"| {r['pct_of_peak']:.1f} | {r['max_rss_mb']:.0f} |")
  return "\n".join(lines)


def _csv(s, cast=str):
  return tuple(cast(v) for v in s.split(",") if v)


def parse_args(argv):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="16 channels, 16x16, tiny budgets (about 30 s; smoke test)")
  ap.add_argument("--out", default="benchmarks/results/throughput.json", help="JSON output path")
  ap.add_argument("--kinds", default=None, help=f"comma-separated subset of {KINDS}")
  ap.add_argument("--sizes", default=None, help="comma-separated resolutions (default 16,32,56)")
  ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,8)")
  ap.add_argument("--inners", default=None, help="comma-separated subset of lm,adam")
  ap.add_argument("--channels", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=3, help="most timed (steady-state) calls per row")
  ap.add_argument("--min-time", type=float, default=1.0, help="stop repeating once this many seconds are timed")
  ap.add_argument("--network", action="store_true", help="add whole-network rows (peel_jax.invert_network)")
  ap.add_argument("--network-only", action="store_true", help="only the whole-network rows (implies --network)")
  ap.add_argument("--network-archs", default="resnet18", help="comma-separated architectures of the network rows")
  ap.add_argument("--network-layers", default="layer1", help="comma-separated observed layers of the network rows")
  ap.add_argument("--network-size", type=int, default=96, help="image side of the network rows")
  ap.add_argument("--network-batch", type=int, default=1, help="images per call of the network rows")
  ap.add_argument("--network-max-iters", type=int, default=None, help="solver iterations per block (network rows)")
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  plan = QUICK if args.quick else FULL
  over = {}
  if args.kinds:
    over["kinds"] = _csv(args.kinds)
    bad = [k for k in over["kinds"] if k not in zoo.PROBLEM_KINDS]
    if bad:
      raise SystemExit(f"unknown kind(s) {bad}; expected a subset of {zoo.PROBLEM_KINDS}")
  if args.sizes:
    over["sizes"] = _csv(args.sizes, int)
  if args.batches:
    over["batches"] = _csv(args.batches, int)
  if args.inners:
    over["inners"] = _csv(args.inners)
    if not set(over["inners"]) <= {"lm", "adam"}:
      raise SystemExit("--inners: expected a subset of lm,adam")
  if args.channels:
    over["channels"] = args.channels
  if args.network_only:
    over["kinds"] = ()
    args.network = True
  plan = dataclasses.replace(plan, **over)
  peak = measure_peak_gflops(plan.peak_n)
  meta = {
      "command": "python -m benchmarks.throughput" + "".join(f" {a}" for a in argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
      "jax": jax.__version__, "peel_jax": peel_jax.__version__,
      "peak_gflops": peak,
      "peak_method": f"best of 5 jitted float32 jnp.dot {plan.peak_n}x{plan.peak_n}, at start and at end; the max",
      "lm_config": dataclasses.asdict(plan.lm_config), "adam_config": dataclasses.asdict(plan.adam_config),
      "flop_model": {"lm_forwards_per_iter": forwards_per_iteration(plan.lm_config),
                     "adam_forwards_per_iter": forwards_per_iteration(plan.adam_config)},
      "memory_note": "max_rss_mb is the whole process's peak RSS (resident-set high-water mark, getrusage), "
                     "not device memory",
      "quick": args.quick,
  }
  print(f"# {meta['command']}\n# {meta['date']}  {meta['devices']}  x{meta['cpu_count']}  peak {peak:.1f} GFLOP/s  "
        f"load {meta['load_average_start']}")
  print(HEADER, flush=True)
  t0 = time.perf_counter()
  rows = []
  configs = {"lm": plan.lm_config, "adam": plan.adam_config}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def write(network):
    meta["total_wall_s"] = time.perf_counter() - t0
    meta["load_average_end"] = list(os.getloadavg())
    result = {"meta": meta, "rows": rows, "network": network}
    with open(args.out, "w") as f:  # after every row, so an interrupted sweep keeps what it measured
      json.dump(result, f, indent=1)
    return result

  for size in plan.sizes:  # smallest sizes first: an interrupted sweep still covers every kind
    for kind in plan.kinds:
      for batch in plan.batches:
        for inner in plan.inners:
          row = measure_block(kind, plan.channels, size, batch, configs[inner], peak, args.repeats, args.min_time)
          rows.append(row)
          print(format_row(row), flush=True)
          write([])
  network = []
  if args.network:
    net_config = peel_jax.SolverConfig() if args.network_max_iters is None else peel_jax.SolverConfig(
        max_iters=args.network_max_iters)
    for arch in _csv(args.network_archs):
      for layer in _csv(args.network_layers):
        try:
          network.append(measure_network(size=args.network_size, batch=args.network_batch, layer=layer,
                                         config=net_config, arch=arch))
          print(f"# network: {json.dumps(network[-1])}", flush=True)
        except Exception as e:  # noqa: BLE001 - a report, not a crash: the other rows are still written
          network.append({"network": arch, "layer": layer, "error": f"{type(e).__name__}: {e}"})
          print(f"# network failed: {network[-1]['error']}", flush=True)
        write(network)
  # The machine may be shared: re-measure the peak at the end and use the better of the two (a peak measured under
  # load would make every row's %-of-peak look too good).
  peak_end = measure_peak_gflops(plan.peak_n)
  meta["peak_gflops_start"], meta["peak_gflops_end"] = peak, peak_end
  meta["peak_gflops"] = best = max(peak, peak_end)
  for r in rows:
    r["peak_gflops"], r["pct_of_peak"] = best, 100.0 * r["achieved_gflops"] / best
  result = write(network)
  print(f"# peak {peak:.1f} GFLOP/s at start, {peak_end:.1f} at end; %-of-peak uses {best:.1f}")
  print(f"# total {meta['total_wall_s']:.0f} s; wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
