import time, jax, jax.numpy as jnp
import peel_jax
from peel_jax import zoo
from peel_jax.problems import block as pb
from peel_jax.solver import engine, anderson
prob = zoo.block_problem("paper", channels=8, size=16, n=1, branch_gain=0.3)
y = prob.y; sh = pb.BlockShared(prob.block, None)
cfg = peel_jax.SolverConfig(max_iters=100, tol=1e-8)
st = engine.batch_init(pb.FIXED_POINT, anderson.ANDERSON, cfg, {"x": y}, y, sh)
st = engine.iterate_batch(pb.FIXED_POINT, anderson.ANDERSON, cfg, y, sh, st)
jax.block_until_ready(st)
t = time.perf_counter()
for _ in range(50): st2 = jax.block_until_ready(engine.iterate_batch(pb.FIXED_POINT, anderson.ANDERSON, cfg, y, sh, st))
print("iterate call", (time.perf_counter() - t) / 50 * 1e3, "ms")
t = time.perf_counter()
for _ in range(50): jax.device_get(jnp.all(st.done | (st.k >= st.budget)))
print("done check", (time.perf_counter() - t) / 50 * 1e3, "ms")
f = jax.jit(lambda s: jnp.all(s.done | (s.k >= s.budget)))
f(st)
t = time.perf_counter()
for _ in range(50): jax.device_get(f(st))
print("jitted done check", (time.perf_counter() - t) / 50 * 1e3, "ms")
