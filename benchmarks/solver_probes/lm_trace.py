import time, sys, dataclasses, jax, jax.numpy as jnp
import peel_jax
from peel_jax import zoo
C, S, gain, cg = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
prob = zoo.block_problem("paper", channels=C, size=S, n=1, branch_gain=gain)
from peel_jax.problems import block as pb
from peel_jax.solver import engine
cfg = peel_jax.SolverConfig(cg_iters=cg, max_iters=100, tol=1e-9)
y = prob.y
st = pb._init_jit(prob.block, y, None, jax.random.split(jax.random.key(0), 1), None, cfg)
sh = pb.BlockShared(prob.block, None)
st = engine.iterate_batch(pb.REDUCED, engine.LM, cfg, y, sh, st)
t = time.perf_counter()
for k in range(int(sys.argv[5])):
  st = engine.iterate_batch(pb.REDUCED, engine.LM, cfg, y, sh, st)
  jax.block_until_ready(st)
  x = st.best_u["x"]
  print(k+2, f"{time.perf_counter()-t:.2f}", f"res={float(st.best_merit[0]):.2e}", f"err={float(peel_jax.relative_error(x, prob.x)[0]):.2e}", f"damp={float(st.inner.damping[0]):.1e}", flush=True)
