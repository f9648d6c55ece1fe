import sys, jax, jax.numpy as jnp
import peel_jax
from peel_jax import zoo
from peel_jax.solver import lm
C, S, gain = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
prob = zoo.block_problem("paper", channels=C, size=S, n=1, branch_gain=gain)
blk = prob.block; y = prob.y[0]; x = prob.x[0]
free = x > 0
e = lambda v: blk(v[None])[0] - y
x0 = jnp.where(free, y, 0.0)
r, jv0 = jax.linearize(e, x)  # Jacobian at truth (true pattern)
jt = jax.linear_transpose(jv0, x)
mask = lambda t: jnp.where(free, t, 0.0)
jv = lambda t: jv0(mask(t)); jtv = lambda w: mask(jt(w)[0])
r0 = jv0(x0 - x)
for it in (10, 20, 40, 80):
  d = jax.jit(lambda r0: lm.cgls(jv, jtv, r0, 0.0, it, x))(r0)
  xn = x0 + d
  print(it, "err", float(jnp.linalg.norm(xn - x) / jnp.linalg.norm(x)), "res", float(jnp.linalg.norm(jv0(xn - x))/jnp.linalg.norm(y)))
# square unconstrained system GMRES check: J at truth, no mask
