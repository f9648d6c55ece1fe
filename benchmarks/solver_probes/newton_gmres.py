# Newton-GMRES on unconstrained square blocks (preact), vs default LM
import time, sys, jax, jax.numpy as jnp
sys.path.insert(0, __import__("os").path.dirname(__file__))
import peel_jax
from peel_jax import zoo
from gmres_probe import gmres_unrolled
kind, C, S = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for gain in (1.0, 0.3):
  prob = zoo.block_problem(kind, channels=C, size=S, n=1, branch_gain=gain)
  print(kind, gain, "nonneg", prob.block.spec.input_nonneg)
  y, x = prob.y[0], prob.x[0]
  e = lambda v: prob.block(v[None])[0] - y
  for m in (10, 20):
    @jax.jit
    def step(v):
      r, jv = jax.linearize(e, v)
      d, rel = gmres_unrolled(jv, -r, m)
      vn = v + d
      return vn, jnp.linalg.norm(e(vn)) / jnp.linalg.norm(y), rel
    v = y; jax.block_until_ready(step(v)); t = time.perf_counter()
    for k in range(12):
      v, res, rel = step(v); res = float(res)
      if res < 1e-6 or k == 11:
        print(f" gmres m={m} k={k} t={time.perf_counter()-t:.3f} res={res:.1e} err={float(jnp.linalg.norm(v-x)/jnp.linalg.norm(x)):.1e} gm={float(rel):.0e}"); break
  f = lambda: peel_jax.invert_block(prob.block, prob.y)
  jax.block_until_ready(f()); t = time.perf_counter(); xh, inf = f(); jax.block_until_ready(xh)
  print(f" lm t={time.perf_counter()-t:.3f} it={int(inf.iterations[0])} res={float(inf.residual[0]):.1e} err={float(peel_jax.relative_error(xh, prob.x)[0]):.1e}")
