"""benchmarks/deployed.py on the smallest unit: the record, resumption, the table, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import deployed
from peel_jax import models


def test_smallest_unit_resumes_and_tabulates(tmp_path, capsys, monkeypatch):
  """The harness around the attacks (the attacks have their own tests): a stand-in solver returns the truth plus
  a little noise, and is called once per unit."""
  calls = []

  def stand_in(method, model, variables, observed, layer, image, peel_seconds):
    calls.append(method)
    return image + 0.01 * jax.random.normal(jax.random.key(0), image.shape), {}

  monkeypatch.setattr(deployed, "solve", stand_in)
  tiny = models.ResNet(stage_sizes=(1,), **models.paper_variant())  # the harness is the same for resnet18
  monkeypatch.setattr(deployed, "build_network", lambda name, size, seed, cache_dir: (
      tiny, tiny.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))))
  out = str(tmp_path / "d")
  opts = {"--out": out, "--networks": "paper_0.3", "--layers": "maxpool,layer1", "--methods": "peel_blockwise",
          "--images": "astronaut", "--size": "32"}
  argv = [t for kv in opts.items() for t in kv]
  assert deployed.main(argv) == 0
  units = os.listdir(os.path.join(out, "units"))
  assert units == ["paper_0.3__layer1__peel_blockwise.json"]  # no stem pool in the paper variant: no maxpool unit
  with open(os.path.join(out, "units", units[0])) as f:
    rec = json.load(f)
  # 16x16x64 signed values for 32x32x3 pixel values: determined by count. The scores are the stand-in's.
  assert rec["status"] == ["determined"] and rec["null_dim_bound"] == [0]
  assert 30.0 < rec["psnr"][0] < 60.0 and 1e-4 < rec["observation_residual"][0] < 1e-1
  mtime = os.path.getmtime(os.path.join(out, "units", units[0]))
  assert deployed.main(argv) == 0  # resumed: the finished unit is not recomputed
  assert os.path.getmtime(os.path.join(out, "units", units[0])) == mtime and calls == ["peel_blockwise"]
  with open(os.path.join(out, "table.md")) as f:
    table = f.read()
  assert "| paper_0.3 | layer1 | peel_blockwise | 1 |" in table and table.count("\n") == 3
  assert deployed.main(["--out", out, "--methods", "magic"]) == 2
  assert "unknown network, layer or method ['magic']" in capsys.readouterr().err
  for flag, value in (("--images", "coffee"), ("--size", "64"), ("--seed", "1")):  # the finished unit is not mixed in
    assert deployed.main([t for kv in {**opts, flag: value}.items() for t in kv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was run on images ['astronaut'] at size 32, seed 0" in err, err
  assert os.path.getmtime(os.path.join(out, "units", units[0])) == mtime and calls == ["peel_blockwise"]


def test_random_batch_stats_change_batchnorm_only():
  model = models.ResNet(stage_sizes=(1, 1))  # BatchNorm in the stem, the blocks and layer2.0's downsample
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  r = deployed.random_batch_stats(v, jax.random.key(1))
  assert np.all(np.asarray(r["batch_stats"]["layer2_0"]["bn1"]["var"]) > 0)
  assert not np.allclose(r["batch_stats"]["bn1"]["mean"], v["batch_stats"]["bn1"]["mean"])
  assert not np.allclose(r["params"]["layer2_0"]["downsample_1"]["scale"], 1.0)
  np.testing.assert_array_equal(r["params"]["layer1_0"]["conv1"]["kernel"], v["params"]["layer1_0"]["conv1"]["kernel"])
  again = deployed.random_batch_stats(v, jax.random.key(1))  # reproducible: no salted hashes
  np.testing.assert_array_equal(again["batch_stats"]["bn1"]["var"], r["batch_stats"]["bn1"]["var"])


def test_certificate_cell_names_the_path_bound_where_the_observation_allows_determinacy():
  assert deployed._certificate_cell({"status": ["underdetermined"] * 2, "null_dim_bound": [95, 8000],
                                     "path_null_dim_bound": [95, 9000], "path_layer": ["maxpool"] * 2}) == (
                                         "underdetermined, >= 95")
  rec = {"status": ["locally_underdetermined", "determined"], "null_dim_bound": [0, 0],
         "path_null_dim_bound": [6766, 0], "path_layer": ["maxpool", "layer1"]}
  assert deployed._certificate_cell(rec) == "determined, locally_underdetermined, >= 0 at the estimate (layer1)"
  rec["path_null_dim_bound"][1] = 2984
  assert deployed._certificate_cell(rec).endswith(">= 2984 at the estimate (layer1)")
  older_unit = {"status": ["determined"], "null_dim_bound": [0]}  # written before the path bound
  assert deployed._certificate_cell(older_unit) == "determined, >= 0"


def test_trained_network_is_trained_once_and_reloaded(tmp_path, monkeypatch):
  """resnet18_trained: a short training run on the bundled digits is cached with its stats, and a rerun loads the
  same variables without training again."""
  from experiments import _training

  cache = str(tmp_path / "networks")
  model, variables, stats = deployed.trained_resnet18(0, cache, steps=2, size=16)
  path = os.path.join(cache, "resnet18_trained_s0_2steps_16px.msgpack")  # the recipe names the file
  assert stats["steps"] == 2 and 0.0 <= stats["holdout_accuracy"] <= 1.0 and np.isfinite(stats["final_loss"])
  assert os.path.exists(path) and os.path.exists(path + ".json")
  init = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert not np.array_equal(variables["params"]["fc"]["kernel"], init["params"]["fc"]["kernel"])  # trained
  def retrain(*args, **kwargs):
    raise AssertionError("retrained")

  monkeypatch.setattr(_training, "train_classifier", retrain)
  _, again, again_stats = deployed.trained_resnet18(0, cache, steps=2, size=16)
  assert again_stats == stats
  jax.tree.map(np.testing.assert_array_equal, again, variables)
