"""Does a convolution cost more inside an XLA loop body? The measurement behind ``SolverConfig.driver``.

    python -m benchmarks.loop_overhead [--channels 64] [--size 56] [--steps 20]

Times one step ``x <- x - 0.01 * A^T (A x - b)`` (a 3x3 convolution and its adjoint, the core of a CG/LM iteration)
four ways: inside ``lax.fori_loop``, the same loop unrolled, a jitted step driven from Python, and an unrolled body of
5 steps inside an outer ``fori_loop``. On the 2-core CPU here (64 channels, 56x56, 2026-11-25, quiet machine) it
measured 6.4 ms per step in a loop body against 2.1 ms unrolled or Python-driven, and 6.3-6.4 ms with an unrolled
body inside an outer loop (12.1 / 2.2 / 12.4 ms earlier under a load of about 4): any convolution inside a loop body
pays about 3x, so the solver unrolls its inner loops and drives the outer one from Python on CPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax import lax


def measure(channels: int = 64, size: int = 56, steps: int = 20) -> dict[str, float]:
  """Milliseconds per step for each way of running ``steps`` steps."""
  kernel = jax.random.normal(jax.random.key(0), (3, 3, channels, channels)) * 0.05
  conv = lambda x: lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  b = jax.random.normal(jax.random.key(1), (1, size, size, channels))
  _, adjoint = jax.vjp(conv, b)
  step = lambda x: x - 0.01 * adjoint(conv(x) - b)[0]

  def body5(x):
    for _ in range(5):
      x = step(x)
    return x

  ways = {
      "fori_loop": jax.jit(lambda x: lax.fori_loop(0, steps, lambda i, x: step(x), x)),
      "unrolled": jax.jit(lambda x: lax.fori_loop(0, steps, lambda i, x: step(x), x, unroll=True)),
      "fori_loop over unrolled 5": jax.jit(lambda x: lax.fori_loop(0, steps // 5, lambda i, x: body5(x), x)),
  }
  out = {}
  for name, fn in ways.items():
    fn(b).block_until_ready()
    t0 = time.perf_counter()
    fn(b).block_until_ready()
    out[name] = (time.perf_counter() - t0) / steps * 1e3
  one = jax.jit(step)
  one(b).block_until_ready()
  t0 = time.perf_counter()
  x = b
  for _ in range(steps):
    x = one(x)
  x.block_until_ready()
  out["python-driven"] = (time.perf_counter() - t0) / steps * 1e3
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--channels", type=int, default=64)
  ap.add_argument("--size", type=int, default=56)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args(argv)
  for name, ms in measure(args.channels, args.size, args.steps).items():
    print(f"{name:28s} {ms:7.2f} ms/step")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
