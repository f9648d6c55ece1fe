import jax, numpy as np, dataclasses
import peel_jax
from peel_jax import zoo
prob = zoo.block_problem("paper", channels=5, size=8, n=8, branch_gain=1.0)
for fp in ("auto", "off"):
  x, inf = peel_jax.invert_block(prob.block, prob.y, config=peel_jax.SolverConfig(fast_path=fp))
  print(fp, inf.path, np.asarray(inf.iterations), np.asarray(inf.residual), np.asarray(peel_jax.relative_error(x, prob.x)))
