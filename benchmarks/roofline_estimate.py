"""Roofline estimates from XLA's own cost analysis: what the GPU/TPU runs of issue 12 should take at best.

    python -m benchmarks.roofline_estimate [--quick] [--out benchmarks/results/roofline_estimate.json]
        [--configs block,resnet18,resnet50] [--no-cpu-timing] [--cpu-time-limit 30]

**Estimates, not measurements**, for every accelerator row. For each configuration of issue 12 it compiles the
solver's programs on the machine it runs on, reads XLA's cost analysis of each compiled executable
(``jax.jit(f).lower(...).compile().cost_analysis()``: ``flops``, ``bytes accessed``) and turns them into
roofline-bound times ``max(flops / peak, bytes / bandwidth)`` on published accelerator figures (:data:`DEVICES`).
On the machine it runs on it also *measures* the same executables and its own peak (a large float32 matmul and a
3x3 convolution, best of a few) and memory bandwidth (a jitted elementwise pass over 256 MiB), so a measured time
stands beside the bound computed from the same analysis.

Configurations (issue 12), float32 throughout, ``SolverConfig(fast_path='off')`` (the AL path: LM inner,
``cg_iters=20``; every iteration the same program, so a solve is iterations x one program):

- ``block``: ``zoo.block_problem('paper', channels=64, size=56, n=N)`` at N = 1, 8, 64. One solver iteration is
  ``solver.engine.iterate_batch(..., steps=1)`` (the step the Python driver calls; the ``while_loop`` driver runs the
  same body). A full solve is one iteration times the iteration count: measured here by a full CPU solve at N = 1
  and 8 for the contractive (``branch_gain=0.3``) and He-scale (1.0) blocks; at N = 64 the batch-8 count is assumed
  (a batched solve runs until its slowest image converges, so the true count can only be higher).
- ``resnet18``: the paper variant (no BN, no post-add ReLU, no stem pool; random init, every branch's last conv
  scaled by 0.3, as the throughput network rows) observed at ``layer4``, 224x224, batch 64: every block on the
  backward path (identical blocks share one program) and the unpooled stem with the pixel box. The whole pass is
  the sum over blocks of iterations x per-iteration cost, at the iteration cap (every block spends its budget: an
  upper bound on the work of a solve with that cap) for the caps 30 (the CPU network rows) and 150 (the default).
- ``resnet50``: the same from ``layer3``.

- ``fast_path`` (issue 13, with ``block``): the default ``SolverConfig()`` on the same blocks, whose fixed-point
  fast path solves contractive blocks at one forward per step and hands the rest to the AL: XLA's cost of one
  fixed-point step beside one AL step, and each full default solve split into its fixed-point and AL iterations
  (the fixed point's count from a solve of the fast path alone), as achieved GFLOP/s and the fraction of this
  machine's measured peak.

What the numbers leave out, and why they are bounds:

- XLA's ``bytes accessed`` is per fused op of the executable compiled *here* (CPU fusion decisions); a GPU or TPU
  compiler fuses differently. Its ``flops`` counts every arithmetic op, elementwise included, and the roofline
  puts all of them at the matrix rate: the compute bound is optimistic. On accelerators the solver's per-iteration
  host work (none for the ``while_loop`` driver, one host sync per iteration for the Python driver), the
  initialisation and the final report are not counted.
- XLA's cost analysis counts a ``while`` loop's body once, so the full-solve figures are assembled from the
  one-iteration programs, not read from the ``while_loop`` solve.
- The CPU "bound" uses this machine's *measured* peaks (the achievable ceiling), the accelerator bounds the
  vendors' *published* peaks (not reached in practice: expect 50-80% of them for large convolutions).

Accelerator peaks used (dense, no sparsity), with their sources: :data:`DEVICES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import peel_jax
from peel_jax import zoo

# Published peaks (dense; TFLOP/s and TB/s). 'fp32' is the precision of jax_default_matmul_precision='highest',
# 'default' that of the default precision on that device.
DEVICES = {
    "H100 SXM5": {
        "fp32_tflops": 67.0, "default_tflops": 494.7, "default_name": "TF32 tensor core", "hbm_tb_s": 3.35,
        "source": "NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: FP32 67 TFLOPS; TF32 Tensor Core 989 "
                  "TFLOPS with sparsity, so 494.7 dense; GPU memory bandwidth 3.35 TB/s (HBM3)",
    },
    "H200 SXM": {
        "fp32_tflops": 67.0, "default_tflops": 494.7, "default_name": "TF32 tensor core", "hbm_tb_s": 4.8,
        "source": "NVIDIA H200 Tensor Core GPU datasheet: FP32 67 TFLOPS and TF32 989 TFLOPS with sparsity "
                  "(494.7 dense), as the H100 SXM; 141 GB HBM3e at 4.8 TB/s",
    },
    "TPU v5e": {
        "fp32_tflops": 197.0 / 6.0, "default_tflops": 197.0, "default_name": "one bf16 MXU pass", "hbm_tb_s": 0.819,
        "source": "Google Cloud TPU v5e documentation: 197 TFLOP/s bf16 peak compute per chip, 16 GiB HBM2 at "
                  "819 GB/s. The TPU has no float32 matrix unit: JAX's default precision rounds float32 operands to "
                  "bf16 (one MXU pass, 197), and 'highest' emulates float32 with 6 bf16 passes, so 197/6 = 32.8 is "
                  "our assumption for it, not a published figure",
    },
}
GAINS = (0.3, 1.0)
CAPS = (30, 150)


@dataclasses.dataclass(frozen=True)
class Plan:
  channels: int
  size: int
  batches: tuple
  solve_batches: tuple  # full CPU solves at these batches
  network_size: int
  network_batch: int
  networks: tuple  # (arch, layer)
  config: peel_jax.SolverConfig
  peak_n: int
  conv_shape: tuple  # (N, H, W, C) of the 3x3 C -> C peak convolution
  bandwidth_mib: int


FULL = Plan(
    channels=64, size=56, batches=(1, 8, 64), solve_batches=(1, 8), network_size=224, network_batch=64,
    networks=(("resnet18", "layer4"), ("resnet50", "layer3")), config=peel_jax.SolverConfig(fast_path="off"),
    peak_n=2048,
    conv_shape=(8, 56, 56, 128), bandwidth_mib=256,
)

QUICK = Plan(
    channels=8, size=16, batches=(1, 2), solve_batches=(1,), network_size=96, network_batch=1,
    networks=(("resnet18", "layer1.0"),), config=peel_jax.SolverConfig(max_iters=4, cg_iters=2, fast_path="off"),
    peak_n=256,
    conv_shape=(1, 16, 16, 16), bandwidth_mib=8,
)


# --- this machine's ceilings ---------------------------------------------------------------------------------------


def _best_time(f, *args, tries: int = 5) -> float:
  jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(tries):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def measure_matmul_gflops(n: int, precision: str | None = None) -> float:
  """Best-of-5 jitted float32 ``n x n`` matmul, GFLOP/s (``2 n^3``), at ``precision`` (None: the current one)."""
  a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
  with jax.default_matmul_precision(precision) if precision else _null():
    f = jax.jit(jnp.dot)
    return 2.0 * n**3 / _best_time(f, a, b) / 1e9


def measure_conv_gflops(shape: tuple, precision: str | None = None) -> float:
  """Best-of-5 jitted float32 3x3 stride-1 SAME convolution ``C -> C`` on ``shape`` (NHWC), GFLOP/s."""
  n, h, w, c = shape
  x = jax.random.normal(jax.random.key(3), shape, jnp.float32)
  k = jax.random.normal(jax.random.key(4), (3, 3, c, c), jnp.float32)
  with jax.default_matmul_precision(precision) if precision else _null():
    f = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC")))
    return 2.0 * n * h * w * c * c * 9 / _best_time(f, x, k) / 1e9


def measure_bandwidth_gb_s(mib: int) -> float:
  """Memory bandwidth, GB/s: the better of a jitted ``jnp.sum`` (bytes read) and ``x * 1.5 + 1`` (bytes read and
  written; a fresh output buffer per call, so it also pays page faults) over ``mib`` MiB of float32, best of 5."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  read = x.size * 4 / _best_time(jax.jit(jnp.sum), x) / 1e9
  rw = 2.0 * x.size * 4 / _best_time(jax.jit(lambda x: x * 1.5 + 1.0), x) / 1e9
  return max(read, rw)


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def machine_ceilings(plan: Plan) -> dict:
  mm = measure_matmul_gflops(plan.peak_n)
  conv = measure_conv_gflops(plan.conv_shape)
  bw = measure_bandwidth_gb_s(plan.bandwidth_mib)
  return {
      "matmul_gflops": mm, "conv_gflops": conv, "peak_gflops": max(mm, conv), "bandwidth_gb_s": bw,
      "method": f"best of 5 jitted float32 calls: jnp.dot {plan.peak_n}x{plan.peak_n}; 3x3 conv {plan.conv_shape} "
                f"C->C; bandwidth: the better of jnp.sum (read) and x*1.5+1 (read + write) over "
                f"{plan.bandwidth_mib} MiB. Peak = the larger of matmul and conv",
  }


# --- cost analysis ---------------------------------------------------------------------------------------------------


def cost_of(compiled) -> dict:
  """``flops``, ``bytes`` and ``transcendentals`` of a compiled executable (XLA's cost analysis)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
    ca = ca[0] if ca else {}
  ca = ca or {}
  return {"flops": float(ca.get("flops", float("nan"))), "bytes": float(ca.get("bytes accessed", float("nan"))),
          "transcendentals": float(ca.get("transcendentals", 0.0))}


def iteration_program(block, y, config: peel_jax.SolverConfig, box=None):
  """``(compiled, args, compile_s, how)``: one batched solver iteration on ``y``, the step the Python driver calls
  and the body of the ``while_loop`` driver (``peel_jax.solver.engine.iterate_batch`` on the block problem of
  :mod:`peel_jax.problems.block`)."""
  from peel_jax.problems import block as pb
  from peel_jax.solver import engine

  box_arr = None if box is None else (jnp.asarray(box[0], y.dtype), jnp.asarray(box[1], y.dtype))
  keys = jax.random.split(jax.random.key(0), y.shape[0])
  st = jax.block_until_ready(pb.init_batch(block, y, None, keys, box_arr, config))
  shared = pb.BlockShared(block, box_arr)
  problem, method = pb.PROBLEMS[config.formulation], engine.METHODS[config.inner]
  lowered = engine.iterate_batch.lower(problem, method, config, y, shared, st, steps=1)
  args, how = (y, shared, st), "engine.iterate_batch(steps=1)"
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, args, time.perf_counter() - t0, how


def fixed_point_program(block, y, config: peel_jax.SolverConfig):
  """``(compiled, args, compile_s, how)`` for one fixed-point step of the fast path on ``y`` (see
  :func:`iteration_program`), and the fast path's own iteration count per image (``int``, the batch's largest)."""
  from peel_jax.problems import block as pb
  from peel_jax.solver import anderson, engine

  fp_config = dataclasses.replace(config, max_iters=config.fast_path_iters, tol=config.tol / pb.FAST_PATH_MARGIN)
  shared = pb.BlockShared(block, None)
  st = jax.block_until_ready(engine.batch_init(pb.FIXED_POINT, anderson.ANDERSON, fp_config, {"x": y}, y, shared))
  lowered = engine.iterate_batch.lower(pb.FIXED_POINT, anderson.ANDERSON, fp_config, y, shared, st, steps=1)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  fp = engine.solve(pb.FIXED_POINT, fp_config, {"x": y}, y, shared, method=anderson.ANDERSON)
  return compiled, (y, shared, st), compile_s, int(np.max(np.asarray(fp.k))), "engine.iterate_batch(FIXED_POINT)"


def fast_path_rows(plan: Plan, ceilings: dict, args) -> list[dict]:
  """Per (gain, batch): one fixed-point step and one AL step (XLA cost, CPU time), and the default solve split
  into both, as achieved GFLOP/s and fraction of this machine's peak."""
  config = dataclasses.replace(plan.config, fast_path="auto")
  rows = []
  for gain in GAINS:
    for n in plan.solve_batches:
      prob = zoo.block_problem("paper", channels=plan.channels, size=plan.size, n=n, branch_gain=gain)
      fp_c, fp_args, _, fp_iters, _ = fixed_point_program(prob.block, prob.y, config)
      al_c, al_args, _, _ = iteration_program(prob.block, prob.y, config)
      fp_cost, al_cost = cost_of(fp_c), cost_of(al_c)
      fp_s, al_s = time_call(fp_c, fp_args, args.repeats), time_call(al_c, al_args, args.repeats)
      fn = lambda: peel_jax.invert_block(prob.block, prob.y, config=config)
      jax.block_until_ready(fn())
      t0 = time.perf_counter()
      x_hat, info = jax.block_until_ready(fn())
      solve_s = time.perf_counter() - t0
      paths = np.asarray(info.path)
      al_iters = int(np.max(np.asarray(info.iterations))) - fp_iters
      flops = fp_iters * fp_cost["flops"] + max(al_iters, 0) * al_cost["flops"]
      rows.append({
          "config": f"block c{plan.channels} s{plan.size} N={n} gain {gain}, default SolverConfig()", "gain": gain,
          "batch": n, "fixed_point_step": {**fp_cost, "measured_s": fp_s}, "al_step": {**al_cost, "measured_s": al_s},
          "solve": {"seconds": solve_s, "fixed_point_iterations": fp_iters, "al_iterations": max(al_iters, 0),
                    "fixed_point_path_fraction": float(np.mean(paths == 1)), "flops": flops,
                    "rel_error_median": float(np.median(np.asarray(peel_jax.relative_error(x_hat, prob.x))))},
          "load_1min": os.getloadavg()[0]})
      print(f"  fast path gain {gain} N={n}: FP step {_fmt_s(fp_s)}, AL step {_fmt_s(al_s)}, solve {_fmt_s(solve_s)} "
            f"({fp_iters} FP + {max(al_iters, 0)} AL iterations)", flush=True)
  return rows


def fast_path_markdown(rows: list[dict], peak_gflops: float) -> str:
  lines = ["| configuration | program | GFLOP | measured | achieved GFLOP/s | fraction of peak |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    for key, label in (("fixed_point_step", "one fixed-point step"), ("al_step", "one AL (LM) step")):
      p = r[key]
      rate = p["flops"] / p["measured_s"] / 1e9
      lines.append(f"| {r['config']} | {label} | {p['flops'] / 1e9:.4g} | {_fmt_s(p['measured_s'])} | {rate:.3g} "
                   f"| {rate / peak_gflops:.0%} |")
    sv = r["solve"]
    rate = sv["flops"] / sv["seconds"] / 1e9
    lines.append(f"| {r['config']} | full solve ({sv['fixed_point_iterations']} FP + {sv['al_iterations']} AL it.; "
                 f"{sv['fixed_point_path_fraction']:.0%} of images on the fast path) | {sv['flops'] / 1e9:.4g} "
                 f"| {_fmt_s(sv['seconds'])} | {rate:.3g} | {rate / peak_gflops:.0%} |")
  return "\n".join(lines)


def time_call(compiled, args, repeats: int = 2) -> float:
  jax.block_until_ready(compiled(*args))  # first run: allocation, warm caches
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bounds(flops: float, nbytes: float) -> dict:
  """Roofline-bound seconds on every device of :data:`DEVICES`, at float32 ('highest') and default precision."""
  out = {}
  for name, d in DEVICES.items():
    mem = nbytes / (d["hbm_tb_s"] * 1e12)
    row = {"memory_s": mem}
    for prec in ("fp32", "default"):
      comp = flops / (d[f"{prec}_tflops"] * 1e12)
      row[f"{prec}_compute_s"] = comp
      row[f"{prec}_s"] = max(comp, mem)
      row[f"{prec}_bound_by"] = "compute" if comp >= mem else "memory"
    out[name] = row
  return out


def cpu_bound(flops: float, nbytes: float, ceilings: dict) -> dict:
  comp = flops / (ceilings["peak_gflops"] * 1e9)
  mem = nbytes / (ceilings["bandwidth_gb_s"] * 1e9)
  return {"compute_s": comp, "memory_s": mem, "bound_s": max(comp, mem), "bound_by": "compute" if comp >= mem else
          "memory"}


def _unit(name, block, y, count, config, ceilings, args, box=None, cpu_batch: int | None = None) -> dict:
  """One distinct block program: XLA's cost of one iteration at ``y``'s batch (for the accelerator bounds) and, in
  ``cpu``, the same at ``cpu_batch`` images (default: the same program), timed here beside its CPU bound."""
  compiled, call_args, compile_s, how = iteration_program(block, y, config, box)
  cost = cost_of(compiled)
  row = {"unit": name, "kind": block.spec.kind, "y_shape": list(y.shape), "count": count, "compile_s": compile_s,
         "program": how,
         **cost, "intensity_flop_per_byte": cost["flops"] / cost["bytes"] if cost["bytes"] else None}
  cpu_cost = cost
  if cpu_batch is not None and cpu_batch < y.shape[0]:
    compiled, call_args, _, _ = iteration_program(block, y[:cpu_batch], config, box)
    cpu_cost = cost_of(compiled)
  batch = cpu_batch if cpu_batch is not None and cpu_batch < y.shape[0] else y.shape[0]
  row["cpu"] = cpu = {"batch": batch, "flops": cpu_cost["flops"], "bytes": cpu_cost["bytes"],
                      **cpu_bound(cpu_cost["flops"], cpu_cost["bytes"], ceilings), "measured_s": None}
  if args.cpu_timing and cpu["bound_s"] <= args.cpu_time_limit:
    cpu["measured_s"] = time_call(compiled, call_args, repeats=args.repeats)
    cpu["load_1min"] = os.getloadavg()[0]
  elif args.cpu_timing:
    cpu["skipped"] = f"bound {cpu['bound_s']:.1f} s > --cpu-time-limit {args.cpu_time_limit}"
  row["bounds"] = bounds(cost["flops"], cost["bytes"])
  measured = "-" if cpu["measured_s"] is None else _fmt_s(cpu["measured_s"])
  print(f"  {name:<16} y{tuple(y.shape)} x{count}: {cost['flops'] / 1e9:9.3f} GFLOP {cost['bytes'] / 1e9:8.3f} GB "
        f"compile {compile_s:5.1f} s | CPU at N={cpu['batch']}: bound {_fmt_s(cpu['bound_s'])} measured {measured} | "
        f"H100 fp32 bound {_fmt_s(row['bounds']['H100 SXM5']['fp32_s'])}", flush=True)
  return row


# --- configurations ---------------------------------------------------------------------------------------------------


def block_configs(plan: Plan, ceilings: dict, args) -> tuple[list[dict], list[dict]]:
  out, units = [], []
  solves = {}  # (gain, batch) -> measured full solve
  for gain in GAINS:
    for n in plan.solve_batches:
      if not args.cpu_timing:
        break
      prob = zoo.block_problem("paper", channels=plan.channels, size=plan.size, n=n, branch_gain=gain)
      fn = lambda: peel_jax.invert_block(prob.block, prob.y, config=plan.config)
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      first = time.perf_counter() - t0
      t0 = time.perf_counter()
      x_hat, info = jax.block_until_ready(fn())
      steady = time.perf_counter() - t0
      solves[(gain, n)] = {"first_call_s": first, "steady_s": steady,
                           "iterations_run": int(np.max(np.asarray(info.iterations))),
                           "rel_error_median": float(np.median(np.asarray(peel_jax.relative_error(x_hat, prob.x)))),
                           "converged_fraction": float(np.mean(np.asarray(info.converged))),
                           "load_1min": os.getloadavg()[0]}
      print(f"  full CPU solve gain {gain} N={n}: {steady:.3g} s, {solves[(gain, n)]['iterations_run']} iterations",
            flush=True)
  for n in plan.batches:
    prob = zoo.block_problem("paper", channels=plan.channels, size=plan.size, n=n, branch_gain=1.0)
    unit = _unit(f"paper/c{plan.channels}/s{plan.size}/N{n}", prob.block, prob.y, 1, plan.config, ceilings, args)
    units.append(unit)
    for gain in GAINS:
      measured = solves.get((gain, n))
      if measured is not None:
        iters, source = measured["iterations_run"], f"measured: full CPU solve at N={n}"
      else:
        known = [solves[(gain, b)] for b in plan.solve_batches if (gain, b) in solves]
        if known:
          iters = known[-1]["iterations_run"]
          source = f"assumed: the N={plan.solve_batches[-1]} count (a larger batch can only need more)"
        else:
          iters, source = plan.config.max_iters, "the iteration cap (no CPU solve run)"
      out.append(_config_row(f"block c{plan.channels} s{plan.size} N={n} gain {gain}", "block", n, [unit],
                             {unit["unit"]: iters}, source, ceilings, cpu_solve=measured, gain=gain))
  return out, units


def _config_row(name, family, batch, units, iterations: dict, source, ceilings, cpu_solve=None, **extra) -> dict:
  """One configuration: per-iteration totals (every unit once) and the full solve (units x count x iterations).

  ``cpu`` parts use the units' CPU programs (``cpu_batch`` images; the same programs unless a smaller CPU batch was
  asked for), so a measured time always stands beside the bound of the very program that was timed.
  """
  def total(key, cpu=False, iters=False):
    return sum((u["cpu"] if cpu else u)[key] * u["count"] * (iterations[u["unit"]] if iters else 1) for u in units)

  measured = [u["cpu"].get("measured_s") for u in units]
  timed = all(m is not None for m in measured)
  row = {
      "config": name, "family": family, "batch": batch, "cpu_batch": units[0]["cpu"]["batch"], **extra,
      "units": [u["unit"] for u in units], "iterations": iterations, "iterations_source": source,
  }
  for part, iters in (("per_iteration", False), ("full", True)):
    flops, nbytes = total("flops", iters=iters), total("bytes", iters=iters)
    cflops, cbytes = total("flops", True, iters), total("bytes", True, iters)
    row[part] = {"flops": flops, "bytes": nbytes, "bounds": bounds(flops, nbytes),
                 "cpu": {"flops": cflops, "bytes": cbytes, **cpu_bound(cflops, cbytes, ceilings),
                         "measured_s": total("measured_s", True, iters) if timed else None}}
  row["full"]["cpu"]["from_iterations"] = True  # the full solve's CPU time is iterations x one-iteration times
  row["full"]["cpu"]["measured_solve"] = cpu_solve
  for dev, b in row["full"]["bounds"].items():
    for prec in ("fp32", "default"):
      b[f"{prec}_images_per_s"] = batch / b[f"{prec}_s"] if b[f"{prec}_s"] > 0 else None
  return row


def network_units(arch: str, layer: str, size: int, batch: int, config, ceilings, args, gain: float = 0.3):
  """The distinct block programs on the backward path from ``layer`` (deepest first) and the stem."""
  from peel_jax import blocks, images, models
  from peel_jax.cli import scale_branches

  model = models.get_model(arch, **models.paper_variant())
  img = jnp.tile(jnp.asarray(images.normalize(images.bundled("astronaut", size)))[None], (batch, 1, 1, 1))
  variables = scale_branches(model.init(jax.random.key(0), img[:1]), gain)
  feats = peel_jax.features(model, variables, img)
  head, _, tail = layer.partition(".")
  stage = int(head[len("layer"):]) - 1
  last = int(tail) if tail else model.stage_sizes[stage] - 1
  units = []
  for s in range(stage, -1, -1):
    top = last if s == stage else model.stage_sizes[s] - 1
    if top >= 1:
      blk = blocks.residual_block(model, variables, s, top)
      units.append(_unit(f"layer{s + 1}.1:{top + 1}", blk, feats[f"layer{s + 1}.{top}"], top, config, ceilings, args,
                         cpu_batch=args.cpu_batch))
    blk = blocks.residual_block(model, variables, s, 0)
    units.append(_unit(f"layer{s + 1}.0", blk, feats[f"layer{s + 1}.0"], 1, config, ceilings, args,
                       cpu_batch=args.cpu_batch))
  stem = blocks.stem_block(model, variables)
  y = feats["maxpool"]
  lo, hi = images.pixel_box()
  shape = stem.input_shape(y.shape)[1:]
  box = (jnp.broadcast_to(jnp.asarray(lo), shape), jnp.broadcast_to(jnp.asarray(hi), shape))
  units.append(_unit("stem", stem, y, 1, config, ceilings, args, box=box, cpu_batch=args.cpu_batch))
  return units


def network_configs(plan: Plan, ceilings: dict, args) -> tuple[list[dict], list[dict]]:
  out, all_units = [], []
  for arch, layer in plan.networks:
    if args.configs and arch not in args.configs:
      continue
    units = network_units(arch, layer, plan.network_size, plan.network_batch, plan.config, ceilings, args)
    for u in units:
      u["network"] = f"{arch}/{layer}"
    all_units += units
    caps = sorted({min(c, plan.config.max_iters) for c in CAPS})
    for cap in caps:
      out.append(_config_row(
          f"{arch} (paper variant, x0.3) from {layer}, {plan.network_size} px, N={plan.network_batch}, "
          f"{cap} iterations per block", "network", plan.network_batch, units, {u["unit"]: cap for u in units},
          f"the cap: every block spends {cap} iterations (an upper bound on the work at this cap)", ceilings,
          arch=arch, layer=layer, size=plan.network_size, cap=cap))
  return out, all_units


def rebound(units: list[dict], configs: list[dict], ceilings: dict) -> None:
  """Recomputes every CPU bound (in place) with ``ceilings``, keeping what was measured."""
  for item in units + [c[p] for c in configs for p in ("per_iteration", "full")]:
    item["cpu"].update(cpu_bound(item["cpu"]["flops"], item["cpu"]["bytes"], ceilings))
    m = item["cpu"].get("measured_s")
    if m:
      item["cpu"]["bound_over_measured"] = item["cpu"]["bound_s"] / m
      item["cpu"]["achieved_gflops"] = item["cpu"]["flops"] / m / 1e9


# --- output ----------------------------------------------------------------------------------------------------------


def _fmt_s(s):
  if s is None:
    return "-"
  if s >= 1:
    return f"{s:.3g} s"
  if s >= 1e-3:
    return f"{s * 1e3:.3g} ms"
  return f"{s * 1e6:.3g} us"


def markdown(result: dict) -> str:
  """Two tables: accelerator bounds (estimates) and this machine's measured time beside its bound."""
  lines = ["| configuration | GFLOP | GB accessed | H100 fp32 bound | H100 TF32 bound | H200 TF32 bound "
           "| TPU v5e fp32 (6-pass) bound | TPU v5e default (bf16) bound | H100 TF32 images/s bound |",
           "|---|---|---|---|---|---|---|---|---|"]
  for c in result["configs"]:
    for part, label in (("per_iteration", "one iteration"), ("full", "full solve")):
      p = c[part]
      b = p["bounds"]
      ips = b["H100 SXM5"].get("default_images_per_s")
      lines.append(
          f"| {c['config']}: {label} | {p['flops'] / 1e9:.4g} | {p['bytes'] / 1e9:.4g} "
          f"| {_fmt_s(b['H100 SXM5']['fp32_s'])} | {_fmt_s(b['H100 SXM5']['default_s'])} "
          f"({b['H100 SXM5']['default_bound_by']}) | {_fmt_s(b['H200 SXM']['default_s'])} "
          f"| {_fmt_s(b['TPU v5e']['fp32_s'])} | {_fmt_s(b['TPU v5e']['default_s'])} "
          f"| {'-' if part != 'full' or ips is None else format(ips, '.4g')} |")
  cpu = ["| configuration | CPU bound | bound by | CPU measured | bound / measured | achieved GFLOP/s |",
         "|---|---|---|---|---|---|"]
  for c in result["configs"]:
    p = c["per_iteration"]
    m = p["cpu"]["measured_s"]
    ratio = "-" if m is None else f"{p['cpu']['bound_s'] / m:.0%}"
    rate = "-" if m is None else f"{p['cpu']['flops'] / m / 1e9:.3g}"
    at = "" if c["cpu_batch"] == c["batch"] else f" (timed at N={c['cpu_batch']})"
    cpu.append(f"| {c['config']}: one iteration{at} | {_fmt_s(p['cpu']['bound_s'])} | {p['cpu']['bound_by']} "
               f"| {_fmt_s(m)} | {ratio} | {rate} |")
    solve = c["full"]["cpu"].get("measured_solve")
    if solve is not None:
      f = c["full"]
      cpu.append(f"| {c['config']}: full solve ({solve['iterations_run']} it.) | {_fmt_s(f['cpu']['bound_s'])} "
                 f"| {f['cpu']['bound_by']} | {_fmt_s(solve['steady_s'])} "
                 f"| {f['cpu']['bound_s'] / solve['steady_s']:.0%} "
                 f"| {f['cpu']['flops'] / solve['steady_s'] / 1e9:.3g} |")
  return "\n".join(lines) + "\n\n" + "\n".join(cpu)


def parse_args(argv):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline_estimate", description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="tiny shapes and budgets (a smoke test; seconds)")
  ap.add_argument("--out", default="benchmarks/results/roofline_estimate.json", help="JSON output path")
  ap.add_argument("--configs", default="block,resnet18,resnet50", help="comma-separated subset of "
                  "block,resnet18,resnet50")
  ap.add_argument("--no-cpu-timing", dest="cpu_timing", action="store_false",
                  help="cost analysis only: time nothing (e.g. on an accelerator, where the XLA analysis of its "
                       "own compiler is what is wanted)")
  ap.add_argument("--cpu-time-limit", type=float, default=30.0,
                  help="time an executable only if its bound on this machine is at most this many seconds")
  ap.add_argument("--repeats", type=int, default=2, help="timed calls per executable (median)")
  ap.add_argument("--cpu-batch", type=int, default=8,
                  help="network configurations: time (and bound) their block programs at this many images here; "
                       "the accelerator estimates use the configuration's own batch")
  args = ap.parse_args(argv)
  args.configs = tuple(c for c in args.configs.split(",") if c)
  bad = set(args.configs) - {"block", "resnet18", "resnet50"}
  if bad:
    ap.error(f"unknown config(s) {sorted(bad)}")
  return args


def main(argv: list[str] | None = None) -> dict:
  from benchmarks.block_solver import _versions, cpu_model

  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  plan = QUICK if args.quick else FULL
  t0 = time.perf_counter()
  meta = {
      "command": "python -m benchmarks.roofline_estimate" + "".join(f" {a}" for a in argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
      "backend": jax.default_backend(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
      "load_average_start": list(os.getloadavg()), "versions": _versions(),
      "matmul_precision": str(jax.config.jax_default_matmul_precision),
      "solver_config": dataclasses.asdict(plan.config), "quick": args.quick,
      "label": "ESTIMATES, NOT MEASUREMENTS, for every accelerator figure; cpu.measured_s are measurements on "
               "this machine (shared, see load averages)",
  }
  print(f"# {meta['command']}\n# {meta['date']} {meta['devices']} {meta['cpu_model']} load "
        f"{meta['load_average_start']}", flush=True)
  ceilings = machine_ceilings(plan)
  print(f"# this machine: matmul {ceilings['matmul_gflops']:.1f} GFLOP/s, conv {ceilings['conv_gflops']:.1f} "
        f"GFLOP/s, bandwidth {ceilings['bandwidth_gb_s']:.1f} GB/s", flush=True)
  configs, units = [], []
  fast = []
  if "block" in args.configs:
    c, u = block_configs(plan, ceilings, args)
    configs, units = configs + c, units + u
    if args.cpu_timing:
      fast = fast_path_rows(plan, ceilings, args)
  c, u = network_configs(plan, ceilings, args)
  configs, units = configs + c, units + u
  # A shared machine: the ceilings are measured again at the end, and the CPU bounds use the better of the two.
  ceilings_end = machine_ceilings(plan)
  best = {k: max(ceilings[k], ceilings_end[k]) for k in ("matmul_gflops", "conv_gflops", "peak_gflops",
                                                            "bandwidth_gb_s")}
  rebound(units, configs, best)
  meta["load_average_end"] = list(os.getloadavg())
  meta["total_wall_s"] = time.perf_counter() - t0
  result = {"meta": meta, "devices": DEVICES,
            "machine": {"start": ceilings, "end": ceilings_end, "used_for_bounds": best},
            "configs": configs, "units": units, "fast_path": fast}
  result["markdown"] = markdown(result)
  if fast:
    result["markdown"] += "\n\n" + fast_path_markdown(fast, best["peak_gflops"])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(result["markdown"])
  print(f"# total {meta['total_wall_s']:.0f} s; load {meta['load_average_end']}; wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
