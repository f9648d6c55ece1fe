"""One program: with driver='scan' the whole backward pass (blocks, stem, refinement) traces under jax.jit, does not
retrace on new data of the same shape, agrees with the eager loop driver, and shards over a one-axis mesh."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peel_jax
from peel_jax import NetworkConfig, SolverConfig, images, models
from peel_jax.cli import scale_branches

BLOCK = SolverConfig(max_iters=4, cg_iters=5)


def _photos(n):
  """``n`` bundled photos at 32x32, normalised."""
  names = ["chelsea", "coffee", "astronaut", "grace_hopper"]
  return jnp.asarray(images.normalize(np.stack([images.bundled(names[i % 4], 32) for i in range(n)])))


def _tiny(model, n):
  """``model`` at 32x32 on ``n`` photos, branches x0.3: ``(model, variables, x)``."""
  x = _photos(n)
  return model, scale_branches(model.init(jax.random.key(2), x), 0.3), x


@pytest.fixture(scope="module")
def resnet34():
  """Paper-variant resnet34 (layer1: three blocks, two stacked for scan) on two photos: built once, as its init
  compiles a random-number program per weight shape (about 10 s of CPU); the sharded test hands it to its process."""
  return _tiny(models.resnet34(small_stem=True, **models.paper_variant()), 2)


def test_jitted_whole_pass_agrees_with_the_loop_driver_and_does_not_retrace(resnet34):
  model, v, x = resnet34
  y = peel_jax.features(model, v, x, "layer1")["layer1"]
  cfg = NetworkConfig.blockwise(block=BLOCK, driver="scan", refine_iters=2)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attack(obs):
    return peel_jax.invert_network(model, v, obs, "layer1", config=cfg)

  xj, rj = attack(y)
  xl, rl = peel_jax.invert_network(model, v, y, "layer1", config=NetworkConfig.blockwise(block=BLOCK, refine_iters=2))
  assert [b.name for b in rj.blocks] == [b.name for b in rl.blocks] == ["layer1.2", "layer1.1", "layer1.0", "stem"]
  for name in ("layer1.2", "layer1.1", "layer1.0"):
    np.testing.assert_allclose(rj.estimates[name], rl.estimates[name], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(rj.block(name).iterations, rl.block(name).iterations)
  np.testing.assert_allclose(xj, xl, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(rj.observation_residual, rl.observation_residual, rtol=1e-2, atol=1e-6)
  # The report is a pytree: per-image arrays as leaves, converted outside jit; time is not measured under jit.
  d = rj.to_numpy().to_dict()
  assert d["driver"] == "scan" and d["blocks"][0]["name"] == "layer1.2" and d["seconds"] is None
  assert rj.psnr is None  # image metrics are numpy: eager only
  # New data of the same shape: no retrace (assert_max_traces raises otherwise).
  x2, _ = attack(y * 1.01)
  assert x2.shape == x.shape


def test_jitted_pass_runs_the_pooled_stem_and_refuses_certification():
  model, v, x = _tiny(models.resnet18(**{**models.paper_variant(), "stem_pool": "max"}), 1)
  y = peel_jax.features(model, v, x, "maxpool")["maxpool"]
  cfg = NetworkConfig.blockwise(block=BLOCK, driver="scan")
  xj, rj = jax.jit(functools.partial(peel_jax.invert_network, model, v, layer="maxpool", config=cfg))(y)
  xe, re = peel_jax.invert_network(model, v, y, "maxpool", config=cfg)
  np.testing.assert_allclose(xj, xe, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(rj.block("stem").iterations, re.block("stem").iterations)
  y1 = peel_jax.features(model, v, x, "layer1")["layer1"]
  with pytest.raises(ValueError, match="certify"):
    jax.jit(functools.partial(peel_jax.invert_network, model, v, layer="layer1",
                              config=NetworkConfig.blockwise(block=BLOCK, driver="scan", certify=True)))(y1)


# The variables come from the parent (the module's resnet34, msgpack): the same values the child's own init would
# give (an init's values depend on the key and the weight shapes only), without compiling that init again.
SHARDED = textwrap.dedent("""
    import functools, sys, jax, jax.numpy as jnp, numpy as np
    from flax import serialization
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import peel_jax
    from peel_jax import NetworkConfig, SolverConfig, images, models
    assert jax.device_count() == 8, jax.devices()
    model = models.resnet34(small_stem=True, **models.paper_variant())
    names = ["chelsea", "coffee", "astronaut", "grace_hopper"]
    x = jnp.asarray(images.normalize(np.stack([images.bundled(names[i % 4], 32) for i in range(8)])))
    x = x + 0.01 * jnp.arange(8.0)[:, None, None, None]
    with open(sys.argv[1], "rb") as f:
      v = jax.tree.map(jnp.asarray, serialization.msgpack_restore(f.read()))
    y = peel_jax.features(model, v, x, "layer1")["layer1"]
    # Solves that converge (small branches, enough iterations): unconverged ones amplify rounding differences.
    cfg = NetworkConfig.blockwise(block=SolverConfig(max_iters=40, cg_iters=10), driver="scan")
    attack = jax.jit(functools.partial(peel_jax.invert_network, model, v, layer="layer1", config=cfg))
    xu, ru = attack(y)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    ys = jax.device_put(y, NamedSharding(mesh, P("batch")))
    xs, rs = attack(ys)
    assert len(ys.sharding.device_set) == 8
    print("max |sharded - unsharded|", float(np.max(np.abs(np.asarray(xs) - np.asarray(xu)))))
    for b in ru.blocks:
      assert np.asarray(b.converged).all(), (b.name, np.asarray(b.residual))
    np.testing.assert_allclose(np.asarray(xs), np.asarray(xu), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(rs.observation_residual), np.asarray(ru.observation_residual),
                               rtol=1e-4, atol=1e-7)
    print("SHARDED_OK")
""")


def test_sharded_jitted_pass_equals_the_unsharded_pass(resnet34, tmp_path):
  from flax import serialization

  _, v, _ = resnet34
  (tmp_path / "variables.msgpack").write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, v)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "variables.msgpack")], env=env,
                       capture_output=True, text=True, timeout=1200,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert "SHARDED_OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
  print(out.stdout)
