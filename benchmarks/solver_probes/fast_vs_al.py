import time, sys, dataclasses, jax, jax.numpy as jnp
import peel_jax
from peel_jax import zoo
C, S = int(sys.argv[1]), int(sys.argv[2])
for gain in [float(a) for a in sys.argv[3].split(",")]:
  prob = zoo.block_problem(sys.argv[4] if len(sys.argv) > 4 else "paper", channels=C, size=S, n=1, branch_gain=gain)
  for fp in ("auto", "off"):
    cfg = peel_jax.SolverConfig(fast_path=fp)
    f = lambda: peel_jax.invert_block(prob.block, prob.y, config=cfg)
    jax.block_until_ready(f()); t = time.perf_counter(); xh, inf = f(); jax.block_until_ready(xh); dt = time.perf_counter() - t
    print(f"gain={gain} fast={fp} t={dt:.3f} it={int(inf.iterations[0])} path={inf.path} res={float(inf.residual[0]):.1e} err={float(peel_jax.relative_error(xh, prob.x)[0]):.1e}", flush=True)
