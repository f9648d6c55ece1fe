import time, jax, jax.numpy as jnp
from peel_jax import zoo
from peel_jax.solver import lm
prob = zoo.block_problem("paper", channels=64, size=56, n=1, branch_gain=1.0)
blk = prob.block; y = prob.y[0]; x = prob.x[0]
e = lambda v: blk(v[None])[0] - y
def cgls_loop(jv, jtv, r, iters, like):
  d = jnp.zeros_like(like); s = -r; g = jtv(s)
  def body(_, c):
    d, s, g, p, gg = c
    q = jv(p); alpha = gg / jnp.maximum(jnp.vdot(q, q), 1e-30)
    d = d + alpha * p; s = s - alpha * q; g = jtv(s); gn = jnp.vdot(g, g)
    p = g + gn / jnp.maximum(gg, 1e-30) * p
    return d, s, g, p, gn
  return jax.lax.fori_loop(0, iters, body, (d, s, g, g, jnp.vdot(g, g)))[0]
def make(kind, it):
  @jax.jit
  def f(v):
    r, jv = jax.linearize(e, v); jt = jax.linear_transpose(jv, v)
    jtv = lambda w: jt(w)[0]
    if kind == "unrolled": return lm.cgls(jv, jtv, r, 0.0, it, v)
    return cgls_loop(jv, jtv, r, it, v)
  return f
for kind in ("unrolled", "loop"):
  f = make(kind, 20); jax.block_until_ready(f(y))
  t = time.perf_counter()
  for _ in range(5): jax.block_until_ready(f(y))
  print(kind, (time.perf_counter() - t) / 5)
