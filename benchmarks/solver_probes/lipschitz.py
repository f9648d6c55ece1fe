import time, sys, jax, jax.numpy as jnp
import peel_jax
from peel_jax import zoo
from peel_jax.baselines.fixed_point import fixed_point
from peel_jax._certify import branch_lipschitz_bound, local_lipschitz
C, S = int(sys.argv[1]), int(sys.argv[2])
for gain in (0.3, 0.5, 0.7, 1.0):
  prob = zoo.block_problem("paper", channels=C, size=S, n=1, branch_gain=gain)
  f = lambda: fixed_point(prob.block, prob.y, iters=200, tol=1e-6)
  jax.block_until_ready(f()); t = time.perf_counter(); xh, inf = f(); jax.block_until_ready(xh); dt = time.perf_counter() - t
  t = time.perf_counter(); b = branch_lipschitz_bound(prob.block, prob.y.shape[1:], iters=10); db = time.perf_counter() - t
  b30 = branch_lipschitz_bound(prob.block, prob.y.shape[1:], iters=50)
  ll = float(local_lipschitz(prob.block, prob.x, iters=30)[0])
  print(f"gain={gain} fp t={dt:.3f} it={int(inf.iterations[0])} res={float(inf.residual[0]):.1e} err={float(peel_jax.relative_error(xh, prob.x)[0]):.1e}  bound10={b:.3f} ({db:.2f}s) bound50={b30:.3f} local={ll:.3f}")
