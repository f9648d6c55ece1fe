import time, sys, jax, jax.numpy as jnp, numpy as np
import peel_jax
from peel_jax import zoo
C, S = int(sys.argv[1]), int(sys.argv[2])
M = int(sys.argv[3]); proj = sys.argv[4] == "proj"; beta = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
for gain in [float(a) for a in sys.argv[6].split(',')]:
  prob = zoo.block_problem("paper", channels=C, size=S, n=1, branch_gain=gain)
  y, x = prob.y[0], prob.x[0]
  blk = prob.block
  F = lambda v: blk.branch(v[None])[0]
  def g(v):
    w = y - F(v)
    return jnp.maximum(w, 0.0) if proj else w
  n = y.size
  @jax.jit
  def aa_step(state):
    xk, X, G, k = state  # X: last M iterates' differences history (M, n), G: residual history
    gx = g(xk)
    f = (gx - xk).ravel()
    # store f and g in ring buffers
    i = k % M
    Fh = X.at[i].set(f); Gh = G.at[i].set(gx.ravel())
    # Anderson (type II) in the form: minimize ||sum a_j f_j|| s.t. sum a_j = 1 over stored
    valid = (jnp.arange(M) <= k)
    Fm = jnp.where(valid[:, None], Fh, 0.0)
    A = Fm @ Fm.T + 1e-10 * jnp.eye(M) * jnp.max(jnp.diag(Fm @ Fm.T)) + jnp.diag(jnp.where(valid, 0.0, 1e10))
    ones = jnp.where(valid, 1.0, 0.0)
    a = jnp.linalg.solve(A, ones); a = a / jnp.sum(a)
    xn = (a @ Gh).reshape(y.shape) * beta + (1 - beta) * (a @ (Gh - Fh)).reshape(y.shape)
    if proj: xn = jnp.maximum(xn, 0.0)
    return (xn, Fh, Gh, k + 1), jnp.linalg.norm(f)
  st = (y, jnp.zeros((M, n)), jnp.zeros((M, n)), 0)
  jax.block_until_ready(aa_step(st))
  t = time.perf_counter()
  for k in range(400):
    st, fn = aa_step(st)
    if True:
      xk = st[0]
      res = float(peel_jax.relative_residual(blk, xk[None], y[None])[0])
      err = float(jnp.linalg.norm(xk - x) / jnp.linalg.norm(x))
      if res < 1e-6 or k == 399 or k % 50 == 0: print(f"g={gain} M={M} k={k} t={time.perf_counter()-t:.2f} res={res:.2e} err={err:.2e}", flush=True)
      if res < 1e-6: break
