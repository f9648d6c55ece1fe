import time, sys, dataclasses, jax, jax.numpy as jnp
import peel_jax
from peel_jax import zoo
from peel_jax.problems import block as pb
from peel_jax.solver import engine, anderson
for gain in (0.3, 0.5, 0.7):
  prob = zoo.block_problem("paper", channels=64, size=56, n=1, branch_gain=gain)
  y = prob.y; sh = pb.BlockShared(prob.block, None)
  u0 = {"x": y}
  for mem in (0, 1, 2, 3, 5):
    cfg = peel_jax.SolverConfig(max_iters=400, anderson_memory=mem)
    f = lambda: engine.solve(pb.FIXED_POINT, cfg, u0, y, sh, method=anderson.ANDERSON)
    jax.block_until_ready(f()); t = time.perf_counter(); st = f(); jax.block_until_ready(st); dt = time.perf_counter() - t
    print(gain, mem, f"{dt:.3f}", int(st.k[0]), f"{float(st.best_merit[0]):.1e}", flush=True)
