import time, jax, jax.numpy as jnp, dataclasses
import peel_jax
from peel_jax import zoo
prob = zoo.block_problem("paper", channels=5, size=8, n=1, branch_gain=1.0)
for fp in ("auto", "off"):
  cfg = peel_jax.SolverConfig(fast_path=fp)
  f = lambda: jax.block_until_ready(peel_jax.invert_block(prob.block, prob.y, config=cfg))
  f(); f()
  t = time.perf_counter()
  for _ in range(20): f()
  print(fp, (time.perf_counter() - t) / 20)
from peel_jax.problems import block as pb
from peel_jax.solver import engine, anderson
cfg = peel_jax.SolverConfig()
y = prob.y; sh = pb.BlockShared(prob.block, None)
g = lambda: jax.block_until_ready(engine.solve(pb.FIXED_POINT, cfg, {"x": y}, y, sh, method=anderson.ANDERSON))
g(); t = time.perf_counter()
for _ in range(20): st = g()
print("fp solve", (time.perf_counter() - t) / 20, st.k)
