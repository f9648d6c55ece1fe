import time, sys, dataclasses, jax, jax.numpy as jnp
import peel_jax
from peel_jax import zoo
from peel_jax.problems import block as pb
from peel_jax.solver import engine
prob = zoo.block_problem("paper", channels=64, size=56, n=1, branch_gain=float(sys.argv[1]))
y = prob.y; sh = pb.BlockShared(prob.block, None)
def cfg(cg): return peel_jax.SolverConfig(cg_iters=cg, max_iters=100, tol=1e-9)
rule = sys.argv[2]
def pick(res, k):
  if rule == "fixed": return int(sys.argv[3])
  # forcing-term style: more CG when closer
  if res > 3e-2: return 10
  if res > 1e-3: return 20
  return 40
for c in (10, 20, 40): 
  st = pb._init_jit(prob.block, y, None, jax.random.split(jax.random.key(0), 1), None, cfg(c))
  jax.block_until_ready(engine.iterate_batch(pb.REDUCED, engine.LM, cfg(c), y, sh, st))
st = pb._init_jit(prob.block, y, None, jax.random.split(jax.random.key(0), 1), None, cfg(20))
t = time.perf_counter(); res = 1.0; mv = 0
for k in range(40):
  c = pick(res, k); mv += 2 * c
  st = engine.iterate_batch(pb.REDUCED, engine.LM, cfg(c), y, sh, st)
  res = float(st.best_merit[0]); err = float(peel_jax.relative_error(st.best_u["x"], prob.x)[0])
  if err < 1e-5:
    print(rule, "k", k + 1, "t", round(time.perf_counter() - t, 2), "matvecs", mv, f"res={res:.1e} err={err:.1e}"); break
