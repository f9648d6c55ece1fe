"""Block-inversion throughput and roofline, in the style of Flax's examples/imagenet fake-data benchmark.

    python -m benchmarks.throughput [--quick] [--out benchmarks/results/throughput.json]
        [--kinds paper,basic,basic_down,bottleneck] [--sizes 16,32,56] [--batches 1,4,8] [--inners lm,adam]
        [--gains 1.0] [--precision default|high|highest] [--network | --network-only]
        [--network-drivers loop,scan] [--network-jit] [--network-variant paper] [--network-gain 0.3]

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
  (``pct_of_peak``: against the best of a jitted float32 ``jnp.dot`` of two ``peak_n x peak_n`` matrices at the
  run's matmul precision, best of a few; ``pct_of_fp32_peak``: against the larger of that matmul and a 3x3
  convolution measured at ``jax_default_matmul_precision='highest'``, true float32. On an NVIDIA GPU the default
  precision runs float32 convolutions and matmuls on TF32 tensor cores, so a default-precision row can exceed 100% of
  the float32 peak; ``meta.peaks`` holds all four measured peaks):
    block forward = sum over its convs (shortcut included) of ``2 * Ho * Wo * Cout * Cin * k * k / groups``;
    LM iteration  = (1 linearize forward + cg_iters * (1 JVP + 1 VJP) + 1 gradient-curvature JVP
                     + len(STEP_LADDER) trial forwards) forwards, with JVP ~ VJP ~ forward;
    Adam iteration = 1 forward + 1 VJP.
  The count leaves out the gradient VJP, CGLS's first VJP and the per-iteration residual/constraint evaluation
  (about 4 more forwards per LM iteration, ~9%) and all elementwise work: achieved GFLOP/s is a lower bound;
- ``max_rss_mb``: on CPU the *process* resident-set high-water mark (``resource.getrusage``), monotone over the
  run; not a per-row device-memory figure. ``device_peak_bytes``: the device's ``memory_stats()['peak_bytes_in_use']``
  where the backend reports it (GPU/TPU; ``None``, printed n/a, on CPU): also a high-water mark of the whole
  process, so per row it is the largest footprint of that row and every row before it. Run one configuration per
  process for a clean per-configuration figure;
- ``--precision``: ``jax_default_matmul_precision`` for the whole run (``highest``: float32 everywhere; the default:
  TF32 on NVIDIA GPUs, bf16 passes on TPUs, float32 on CPU). Rows keep their residual and input error, so a
  ``highest`` run beside a default one gives speed and accuracy of both.

``--network`` adds whole-network rows (``peel_jax.invert_network``, paper-variant ResNet-18 with branches scaled
by 0.3, from ``layer1`` at 96x96, batch 1), one per driver of ``--network-drivers`` (``loop``, ``scan``) and, with
``--network-jit`` where ``peel_jax.NetworkConfig`` exists (the one-program backward pass), a row for
``jax.jit`` of the whole pass with the scan driver: its ``compile_s`` is ``lower().compile()`` alone, and
``xla_flops_once`` XLA's cost analysis of that program (a ``while`` body counted once: not the work done). Network
rows carry a model FLOP count (every block's forward, as above, times its LM iterations and the batch; the stem
included as its convolution) and the achieved rate against the peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
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
  gains: tuple = (1.0,)
  conv_shape: tuple = (8, 56, 56, 128)  # (N, H, W, C) of the 3x3 C -> C convolution of the float32 peak


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
    conv_shape=(1, 16, 16, 16),
)
ACCELERATOR_PEAK = dict(peak_n=8192, conv_shape=(64, 56, 56, 256))  # FULL plan off CPU: big enough to fill a GPU


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


def _best_seconds(fn, args, tries: int, precision: str | None) -> float:
  """Best-of-``tries`` wall time of ``jax.jit(fn)(*args)``, warm, at matmul ``precision`` (None: the current one)."""
  with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
    f = jax.jit(fn)
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(tries):
      t0 = time.perf_counter()
      f(*args).block_until_ready()
      best = min(best, time.perf_counter() - t0)
  return best


def measure_peak_gflops(n: int = PEAK_N, tries: int = 5, precision: str | None = None) -> float:
  """Best-of-``tries`` float32 matmul rate, GFLOP/s (``2 n^3`` FLOPs), at ``precision`` (None: the current one)."""
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  return 2.0 * n**3 / _best_seconds(jnp.dot, (a, b), tries, precision) / 1e9


def measure_conv_gflops(shape: tuple, tries: int = 5, precision: str | None = None) -> float:
  """Best-of-``tries`` rate of a float32 3x3 SAME convolution ``C -> C`` on ``shape`` (NHWC), GFLOP/s."""
  n, h, w, c = shape
  x = jax.random.normal(jax.random.key(3), shape, jnp.float32)
  k = jax.random.normal(jax.random.key(4), (3, 3, c, c), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return 2.0 * n * h * w * c * c * 9 / _best_seconds(conv, (x, k), tries, precision) / 1e9


def measure_peaks(plan: "Plan") -> dict:
  """The four peaks of ``meta.peaks``: matmul and 3x3 conv, at ``'highest'`` (float32) and ``'default'``."""
  out = {}
  for prec in ("highest", "default"):
    out[f"matmul_{prec}_gflops"] = measure_peak_gflops(plan.peak_n, precision=prec)
    out[f"conv_{prec}_gflops"] = measure_conv_gflops(plan.conv_shape, precision=prec)
  out["fp32_gflops"] = max(out["matmul_highest_gflops"], out["conv_highest_gflops"])
  return out


# --- measurement -----------------------------------------------------------------------------------------------------


def _max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _device_peak_bytes():
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - CPU backends may not implement it
    return None
  return None if not stats else stats.get("peak_bytes_in_use")


def _device_memory_stats() -> dict | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  return None if not stats else {k: int(v) for k, v in stats.items() if isinstance(v, (int, float))}


def _timed(fn, repeats: int, min_time: float):
  """(output, first-call seconds, steady-state median seconds or None, steady calls); ``repeats=0``: first call only."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  if repeats <= 0:
    return out, first, None, 0
  times = []
  while len(times) < repeats:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
    if sum(times) >= min_time:
      break
  return out, first, float(np.median(times)), len(times)


def measure_block(kind: str, channels: int, size: int, batch: int, config: peel_jax.SolverConfig, peak: float,
                  repeats: int, min_time: float, gain: float = 1.0, fp32_peak: float | None = None) -> dict:
  prob = zoo.block_problem(kind, channels=channels, size=size, n=batch, branch_gain=gain)
  fn = lambda: peel_jax.invert_block(prob.block, prob.y, config=config)
  (x_hat, info), first, steady, calls = _timed(fn, max(1, repeats), min_time)
  err = np.asarray(peel_jax.relative_error(x_hat, prob.x), np.float64)
  res = np.asarray(peel_jax.relative_residual(prob.block, x_hat, prob.y), np.float64)
  iters = np.asarray(info.iterations)
  run_iters = int(iters.max())
  fwd = block_forward_flops(prob.block, size)
  per_iter = fwd * forwards_per_iteration(config)
  achieved = per_iter * batch * run_iters / steady / 1e9
  fp32_peak = fp32_peak or peak
  return {
      "kind": kind, "channels": channels, "size": size, "batch": batch, "branch_gain": gain, "inner": config.inner,
      "max_iters": config.max_iters, "cg_iters": config.cg_iters if config.inner == "lm" else None,
      "compile_s": max(first - steady, 0.0), "first_call_s": first, "steady_s": steady, "timed_calls": calls,
      "images_per_s": batch / steady, "iterations_run": run_iters, "iterations_median": float(np.median(iters)),
      "iters_per_s": run_iters / steady,
      "rel_error_median": float(np.median(err)), "rel_error_worst": float(np.max(err)),
      "residual_median": float(np.median(res)), "residual_worst": float(np.max(res)),
      "converged_fraction": float(np.mean(np.asarray(info.converged))),
      "forward_gflop": fwd / 1e9, "gflop_per_iter": per_iter / 1e9, "achieved_gflops": achieved,
      "peak_gflops": peak, "pct_of_peak": 100.0 * achieved / peak,
      "fp32_peak_gflops": fp32_peak, "pct_of_fp32_peak": 100.0 * achieved / fp32_peak, "max_rss_mb": _max_rss_mb(),
      "device_peak_bytes": _device_peak_bytes(), "load_1min": os.getloadavg()[0],
  }


def network_gflop(model, variables, report, feats: dict, config: peel_jax.SolverConfig, batch: int) -> float:
  """Model FLOP count of a backward pass: per block (the stem too), forward x LM forwards per iteration x its
  iterations (the batch maximum: a batched solve runs until its slowest image is done) x the batch."""
  from peel_jax import blocks

  total = 0.0
  for b in report.blocks:
    blk = blocks.extract(model, variables, b.name)
    out = feats["maxpool" if b.name == "stem" else b.name]
    size = blk.input_shape(out.shape)[1]
    total += block_forward_flops(blk, size) * forwards_per_iteration(config) * int(np.max(b.iterations))
  return total * batch / 1e9


def _network_fn(model, variables, obs, img, layer: str, config, driver: str, jit: bool):
  """``(fn, compile_s, xla_cost)``: a call of the backward pass with this API (``NetworkConfig`` if it exists)."""
  if hasattr(peel_jax, "NetworkConfig"):
    paper = getattr(peel_jax.NetworkConfig, "blockwise", peel_jax.NetworkConfig)  # the block-wise pass alone
    net = paper(block=config, driver=driver)
    if jit:
      f = jax.jit(lambda v, o: peel_jax.invert_network(model, v, o, layer, config=net))
      t0 = time.perf_counter()
      compiled = f.lower(variables, obs).compile()
      compile_s = time.perf_counter() - t0
      try:
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
        cost = {"xla_flops_once": cost.get("flops"), "xla_bytes_once": cost.get("bytes accessed")}
      except Exception as e:  # noqa: BLE001 - a figure, not a requirement
        cost = {"xla_cost_error": f"{type(e).__name__}: {e}"}
      return functools.partial(compiled, variables, obs), compile_s, cost
    return (lambda: peel_jax.invert_network(model, variables, obs, layer, config=net, image=img)), None, {}
  if jit:
    raise NotImplementedError("the one-program backward pass needs peel_jax.NetworkConfig (issue 9)")
  return (lambda: peel_jax.invert_network(model, variables, obs, layer, image=img, config=config,
                                          driver=driver)), None, {}


def measure_network(size: int = 96, batch: int = 1, gain: float = 0.3, layer: str = "layer1",
                    config: peel_jax.SolverConfig | None = None, arch: str = "resnet18",
                    variant: str = "paper", driver: str = "loop", jit: bool = False, repeats: int = 1,
                    peak: float | None = None, fp32_peak: float | None = None) -> dict:
  """One whole-network row: ``peel_jax.invert_network`` on ``arch`` (``variant``: ``'paper'`` or ``'torchvision'``),
  random init with every branch's last affine map scaled by ``gain``, a bundled photo tiled ``batch`` times.
  ``repeats=0`` times the first call only (compile included): ``steady_s`` is then None."""
  from peel_jax import images, metrics, models
  from peel_jax.cli import scale_branches

  img = jnp.asarray(images.normalize(images.bundled("astronaut", size)))[None]
  img = jnp.tile(img, (batch, 1, 1, 1))
  model = models.get_model(arch, **(models.paper_variant() if variant == "paper" else {}))
  variables = scale_branches(model.init(jax.random.key(0), img[:1]), gain)
  feats = peel_jax.features(model, variables, img)
  config = config or peel_jax.SolverConfig()
  fn, aot_compile_s, cost = _network_fn(model, variables, feats[layer], img, layer, config, driver, jit)
  (x_hat, report), first, steady, calls = _timed(fn, repeats, 0.0)
  blocks_ = [b for b in report.blocks if b.name != "stem"]
  psnr = report.psnr
  if psnr is None:  # the jitted pass is given no image: measure outside
    psnr = metrics.image_metrics(images.denormalize(x_hat), images.denormalize(img))["psnr"]
  wall = steady if steady is not None else first
  try:
    gflop = network_gflop(model, variables, report, feats, config, batch)
  except Exception:  # noqa: BLE001 - a report that does not name its blocks
    gflop = None
  achieved = None if gflop is None else gflop / wall
  compile_s = aot_compile_s if aot_compile_s is not None else (None if steady is None else max(first - steady, 0.0))
  return {
      "network": f"{arch} ({variant} variant)", "branch_gain": gain, "layer": layer, "size": size, "batch": batch,
      "driver": driver, "jit": jit, "api": "NetworkConfig" if hasattr(peel_jax, "NetworkConfig") else "keywords",
      "max_iters": config.max_iters, "blocks": len(blocks_),
      "compile_s": compile_s, "first_call_s": first, "steady_s": steady, "timed_calls": calls,
      "images_per_s": batch / wall, "images_per_s_from": "steady" if steady is not None else "first call",
      "block_iterations": int(sum(int(np.max(b.iterations)) for b in blocks_)),
      "blocks_converged_fraction": float(np.mean([b.converged_fraction for b in blocks_])) if blocks_ else None,
      "psnr_median": float(np.median(np.asarray(psnr))),
      "observation_residual_median": float(np.median(np.asarray(report.observation_residual))),
      "model_gflop": gflop, "achieved_gflops": achieved,
      "pct_of_peak": None if achieved is None or not peak else 100.0 * achieved / peak,
      "pct_of_fp32_peak": None if achieved is None or not fp32_peak else 100.0 * achieved / fp32_peak,
      **cost, "device_peak_bytes": _device_peak_bytes(),
      "max_rss_mb": _max_rss_mb(), "load_1min": os.getloadavg()[0],
  }


# --- output -----------------------------------------------------------------------------------------------------------


HEADER = (f"{'kind':<10} {'size':>4} {'N':>2} {'gain':>4} {'inner':<5} {'compile':>7} {'img/s':>8} {'it/s':>7} "
          f"{'iters':>5} {'err med':>8} {'conv':>4} {'GF/it':>7} {'GF/s':>7} {'%peak':>6} {'RSS MB':>7}")


def format_row(r: dict) -> str:
  return (f"{r['kind']:<10} {r['size']:>4d} {r['batch']:>2d} {r.get('branch_gain', 1.0):>4.1f} {r['inner']:<5} "
          f"{r['compile_s']:>7.2f} "
          f"{r['images_per_s']:>8.3g} {r['iters_per_s']:>7.3g} {r['iterations_run']:>5d} {r['rel_error_median']:>8.1e} "
          f"{r['converged_fraction']:>4.2f} {r['gflop_per_iter']:>7.3g} {r['achieved_gflops']:>7.3g} "
          f"{r['pct_of_peak']:>6.1f} {r['max_rss_mb']:>7.0f}")


def _cpu_model() -> str:
  from benchmarks.block_solver import cpu_model

  return cpu_model()


def _jaxlib_version() -> str:
  import jaxlib

  return getattr(jaxlib, "__version__", "unknown")


def _gib(b) -> str:
  return "n/a" if b is None else f"{b / 2**30:.2f}"


def markdown_table(rows: list[dict]) -> str:
  head = ("| kind | size | N | gain | inner | compile s | images/s | iters/s | iters | rel err med | residual med "
          "| converged | GFLOP/iter/img | achieved GFLOP/s | % of peak | % of fp32 peak | device peak GiB "
          "| max RSS MB |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
        f"| {r['kind']} | {r['size']} | {r['batch']} | {r.get('branch_gain', 1.0)} | {r['inner']} "
        f"| {r['compile_s']:.1f} | {r['images_per_s']:.3g} "
        f"| {r['iters_per_s']:.3g} | {r['iterations_run']} | {r['rel_error_median']:.1e} "
        f"| {r.get('residual_median', float('nan')):.1e} | "
        f"{r['converged_fraction']:.2f} | {r['gflop_per_iter']:.3g} | {r['achieved_gflops']:.3g} "
        f"| {r['pct_of_peak']:.1f} | {r.get('pct_of_fp32_peak', float('nan')):.1f} "
        f"| {_gib(r.get('device_peak_bytes'))} | {r['max_rss_mb']:.0f} |")
  return "\n".join(lines)


def network_markdown_table(rows: list[dict]) -> str:
  head = ("| network | layer | size | N | driver | jit | first call s | compile s | steady s | images/s "
          "| block iterations | PSNR dB | observation residual | model GFLOP | achieved GFLOP/s | % of fp32 peak "
          "| device peak GiB |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  f = lambda v, spec: "-" if v is None else format(v, spec)
  for r in rows:
    if "error" in r or "skipped" in r:
      lines.append(f"| {r['network']} | {r['layer']} | | | {r.get('driver')} | {r.get('jit')} "
                   f"| {r.get('error') or r.get('skipped')} |" + " |" * 11)
      continue
    lines.append(
        f"| {r['network']} | {r['layer']} | {r['size']} | {r['batch']} | {r['driver']} | {r['jit']} "
        f"| {r['first_call_s']:.1f} | {f(r['compile_s'], '.1f')} | {f(r['steady_s'], '.2f')} "
        f"| {r['images_per_s']:.3g} | {r['block_iterations']} | {r['psnr_median']:.1f} "
        f"| {r['observation_residual_median']:.1e} | {f(r['model_gflop'], '.4g')} | {f(r['achieved_gflops'], '.4g')} "
        f"| {f(r['pct_of_fp32_peak'], '.1f')} | {_gib(r.get('device_peak_bytes'))} |")
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
  ap.add_argument("--network-cg-iters", type=int, default=None, help="CGLS iterations per LM step (network rows)")
  ap.add_argument("--network-drivers", default="loop", help="comma-separated subset of loop,scan (network rows)")
  ap.add_argument("--network-jit", action="store_true",
                  help="add a row for jax.jit of the whole backward pass (scan driver; needs peel_jax.NetworkConfig)")
  ap.add_argument("--network-variant", default="paper", choices=("paper", "torchvision"))
  ap.add_argument("--network-gain", type=float, default=0.3, help="scale of every branch's last affine map")
  ap.add_argument("--network-repeats", type=int, default=1,
                  help="steady-state calls per network row after the first (0: the first call only)")
  ap.add_argument("--gains", default=None, help="comma-separated branch gains of the block rows (default 1.0)")
  ap.add_argument("--precision", default=None, choices=("default", "high", "highest"),
                  help="jax_default_matmul_precision for the whole run (default: leave JAX's)")
  ap.add_argument("--peak-n", type=int, default=None,
                  help="matmul side of the peak (default 2048 on CPU, 8192 on accelerators; 512 with --quick)")
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
  if args.gains:
    over["gains"] = _csv(args.gains, float)
  if args.network_only:
    over["kinds"] = ()
    args.network = True
  if not args.quick and jax.default_backend() != "cpu":
    over.update(ACCELERATOR_PEAK)
  if args.peak_n:
    over["peak_n"] = args.peak_n
  plan = dataclasses.replace(plan, **over)
  drivers = _csv(args.network_drivers)
  if not set(drivers) <= {"loop", "scan"}:
    raise SystemExit("--network-drivers: expected a subset of loop,scan")
  if args.precision:
    jax.config.update("jax_default_matmul_precision", args.precision)
  peak = measure_peak_gflops(plan.peak_n)
  peaks = measure_peaks(plan)
  meta = {
      "command": "python -m benchmarks.throughput" + "".join(f" {a}" for a in argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "devices": [str(d) for d in jax.devices()], "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "load_average_start": list(os.getloadavg()),
      "device_kind": jax.devices()[0].device_kind, "cpu_model": _cpu_model(),
      "jax": jax.__version__, "jaxlib": _jaxlib_version(), "peel_jax": peel_jax.__version__,
      "matmul_precision": str(jax.config.jax_default_matmul_precision),
      "peak_gflops": peak, "peaks": peaks,
      "peak_method": f"best of 5 jitted float32 jnp.dot {plan.peak_n}x{plan.peak_n} at the run's precision, at start "
                     f"and at end; the max. peaks: the same at 'highest' and 'default', and a 3x3 conv "
                     f"{plan.conv_shape} C->C; fp32_gflops = the larger at 'highest'",
      "device_memory_stats_start": _device_memory_stats(),
      "lm_config": dataclasses.asdict(plan.lm_config), "adam_config": dataclasses.asdict(plan.adam_config),
      "flop_model": {"lm_forwards_per_iter": forwards_per_iteration(plan.lm_config),
                     "adam_forwards_per_iter": forwards_per_iteration(plan.adam_config)},
      "memory_note": "max_rss_mb is the whole process's peak RSS (resident-set high-water mark, getrusage), "
                     "not device memory; device_peak_bytes is the device's peak_bytes_in_use (also a process "
                     "high-water mark; None = n/a: the backend reports no memory_stats)",
      "quick": args.quick,
  }
  print(f"# {meta['command']}\n# {meta['date']}  {meta['devices']}  x{meta['cpu_count']}  peak {peak:.1f} GFLOP/s  "
        f"(float32 {peaks['fp32_gflops']:.1f}; precision {meta['matmul_precision']})  "
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
        for gain in plan.gains:
          for inner in plan.inners:
            row = measure_block(kind, plan.channels, size, batch, configs[inner], peak, args.repeats, args.min_time,
                                gain=gain, fp32_peak=peaks["fp32_gflops"])
            rows.append(row)
            print(format_row(row), flush=True)
            write([])
  network = []
  if args.network:
    net_over = {k: v for k, v in (("max_iters", args.network_max_iters), ("cg_iters", args.network_cg_iters))
                if v is not None}
    net_config = peel_jax.SolverConfig(**net_over)
    runs = [(d, False) for d in drivers] + ([("scan", True)] if args.network_jit else [])
    for arch in _csv(args.network_archs):
      for layer in _csv(args.network_layers):
        for driver, jit in runs:
          if jit and not hasattr(peel_jax, "NetworkConfig"):
            network.append({"network": arch, "layer": layer, "driver": driver, "jit": True,
                            "skipped": "peel_jax.NetworkConfig does not exist here (issue 9 not landed)"})
            print(f"# network jit row skipped: {network[-1]['skipped']}", flush=True)
            write(network)
            continue
          try:
            network.append(measure_network(
                size=args.network_size, batch=args.network_batch, layer=layer, config=net_config, arch=arch,
                variant=args.network_variant, gain=args.network_gain, driver=driver, jit=jit,
                repeats=args.network_repeats, peak=peak, fp32_peak=peaks["fp32_gflops"]))
            print(f"# network: {json.dumps(network[-1])}", flush=True)
          except Exception as e:  # noqa: BLE001 - a report, not a crash: the other rows are still written
            network.append({"network": arch, "layer": layer, "driver": driver, "jit": jit,
                            "error": f"{type(e).__name__}: {e}"})
            print(f"# network failed: {network[-1]['error']}", flush=True)
          write(network)
  # The machine may be shared: re-measure the peak at the end and use the better of the two (a peak measured under
  # load would make every row's %-of-peak look too good).
  peak_end = measure_peak_gflops(plan.peak_n)
  peaks_end = measure_peaks(plan)
  meta["peak_gflops_start"], meta["peak_gflops_end"] = peak, peak_end
  meta["peak_gflops"] = best = max(peak, peak_end)
  meta["peaks_start"], meta["peaks_end"] = peaks, peaks_end
  meta["peaks"] = {k: max(peaks[k], peaks_end[k]) for k in peaks}
  fp32 = meta["peaks"]["fp32_gflops"]
  meta["device_memory_stats_end"] = _device_memory_stats()
  for r in rows:
    r["peak_gflops"], r["pct_of_peak"] = best, 100.0 * r["achieved_gflops"] / best
    r["fp32_peak_gflops"], r["pct_of_fp32_peak"] = fp32, 100.0 * r["achieved_gflops"] / fp32
  for r in network:
    if r.get("achieved_gflops"):
      r["pct_of_peak"], r["pct_of_fp32_peak"] = 100.0 * r["achieved_gflops"] / best, 100.0 * r["achieved_gflops"] / fp32
  result = write(network)
  print(f"# peak {peak:.1f} GFLOP/s at start, {peak_end:.1f} at end; %-of-peak uses {best:.1f}; "
        f"float32 peak {fp32:.1f} ({json.dumps({k: round(v, 1) for k, v in meta['peaks'].items()})})")
  print(f"# total {meta['total_wall_s']:.0f} s; wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
