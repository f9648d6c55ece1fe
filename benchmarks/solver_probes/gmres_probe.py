import time, sys, functools, jax, jax.numpy as jnp, numpy as np
import peel_jax
from peel_jax import zoo

def gmres_unrolled(jv, b, m):
  """min ||J d - b|| over the Krylov space K_m(J, b) from d=0. CGS2 Arnoldi, unrolled."""
  n = b.size
  beta = jnp.linalg.norm(b)
  V = jnp.zeros((m + 1, n), b.dtype).at[0].set(b.ravel() / beta)
  H = jnp.zeros((m + 1, m), b.dtype)
  for j in range(m):
    w = jv(V[j].reshape(b.shape)).ravel()
    h = V @ w  # rows > j are zero
    w = w - V.T @ h
    h2 = V @ w
    w = w - V.T @ h2
    h = h + h2
    hn = jnp.linalg.norm(w)
    H = H.at[:, j].set(h.at[j + 1].set(hn))
    V = V.at[j + 1].set(w / jnp.maximum(hn, 1e-30))
  e1 = jnp.zeros((m + 1,), b.dtype).at[0].set(beta)
  yv = jnp.linalg.lstsq(H, e1)[0]
  return (V[:m].T @ yv).reshape(b.shape), jnp.linalg.norm(H @ yv - e1) / beta

LADDER = (1.0, 0.5, 0.25)

def make_step(block, y, m):
  e = lambda x: block(x[None])[0] - y
  @jax.jit
  def step(x):
    r, jv = jax.linearize(e, x)
    d, rel = gmres_unrolled(jv, -r, m)
    c0 = jnp.linalg.norm(r)
    best, bc, taken = x, c0, False
    for t in LADDER:
      tr = jnp.maximum(x + t * d, 0.0)
      c = jnp.linalg.norm(e(tr))
      ok = (~taken) & (c < bc)
      best = jnp.where(ok, tr, best); bc = jnp.where(ok, c, bc); taken = taken | ok
    return best, bc / jnp.linalg.norm(y), rel
  return step

