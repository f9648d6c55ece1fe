"""The ``peel-jax`` command: results written atomically, bad input refused with one line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peel_jax import images, models, port
from peel_jax._certify_network import STATUSES
from peel_jax.cli import main

# A tiny, fast case: paper variant (no stem pool), 64x64, small branches, few solver iterations.
TINY = ["--variant", "paper", "--size", "64", "--layer", "layer1", "--branch-gain", "0.3", "--max-iters", "5",
        "--cg-iters", "5", "--seed", "3", "--refine", "2", "--refine-start", "blockwise"]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("img") / "face.png"
  images.save_png(path, images.bundled("grace_hopper", 80))
  return str(path)


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("peel-jax: error: ")
  return lines[0]


def _leftovers(parent) -> list[str]:
  return [n for n in os.listdir(parent) if ".tmp-" in n]


def test_invert_writes_metrics_and_figures(tmp_path, image_file, capsys):
  out = tmp_path / "run"
  assert main(["invert", "--image", image_file, "--out", str(out), *TINY]) == 0
  assert sorted(os.listdir(out)) == ["blocks.png", "metrics.json", "reconstruction.png", "recovered.png"]
  m = json.loads((out / "metrics.json").read_text())
  assert {"psnr", "mse", "ssim", "seconds", "blocks", "arch", "variant", "layer", "size", "seed"} <= set(m)
  assert (m["arch"], m["variant"], m["layer"], m["size"], m["seed"]) == ("resnet18", "paper", "layer1", 64, 3)
  assert [b["name"] for b in m["blocks"]] == ["layer1.1", "layer1.0", "stem"]
  for b in m["blocks"]:
    assert {"name", "input_rel_error", "residual", "iterations", "converged"} <= set(b)
  assert m["psnr"] > 30.0
  assert m["weights"] is None and "random" in m["init"]
  # The refinement ran with the default prior 'auto', which gives no prior here: the image is determined by count.
  assert m["solver"]["prior"] == "auto" and m["refine"]["with_prior"] is False and m["null_dim_bound"] == 0
  # The network certificate at the reconstruction: the counts are exact (no stem pool: 64 channels x 32 x 32
  # observed values, all of them equations) and the status is one of the documented ones.
  cert = m["network_certificate"]
  assert cert["pixels"] == 64 * 64 * 3 and cert["observed_values"] == 64 * 32 * 32
  assert cert["null_dim_bound"] == 0 and cert["status"] in STATUSES
  for png in ("blocks.png", "reconstruction.png", "recovered.png"):
    with open(out / png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "layer1.0" in capsys.readouterr().out
  assert _leftovers(tmp_path) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, image_file, capsys):
  out = tmp_path / "run"
  out.mkdir()
  (out / "metrics.json").write_text("{\"earlier\": true}")
  assert main(["invert", "--image", image_file, "--out", str(out), *TINY]) == 2
  assert "--overwrite" in _one_error_line(capsys)
  assert (out / "metrics.json").read_text() == "{\"earlier\": true}"  # untouched
  assert main(["invert", "--image", image_file, "--out", str(out), "--overwrite", *TINY]) == 0
  assert "earlier" not in json.loads((out / "metrics.json").read_text())
  assert _leftovers(tmp_path) == []


def _resnet18_weights(tmp_path, suffix):
  model = models.resnet18()
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  sd = port.to_torchvision(v, "resnet18")
  path = tmp_path / f"resnet18{suffix}"
  if suffix == ".safetensors":
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(a) for k, a in sd.items()}, str(path))
  else:
    import torch

    torch.save({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in sd.items()}, str(path))
  return str(path)


@pytest.mark.parametrize("case", ["unknown_layer", "unreadable_image", "missing_image", "weights_other_arch",
                                  "missing_weights", "bad_size", "unknown_arch", "prior_without_refinement"])
def test_bad_input_exits_2_with_one_line(case, tmp_path, image_file, capsys):
  out = tmp_path / "run"
  args = ["invert", "--image", image_file, "--out", str(out), "--size", "64", "--layer", "layer1"]
  expect = {
      "unknown_layer": "unknown layer 'layer7'",
      "unreadable_image": "cannot read",
      "missing_image": "not found",
      "weights_other_arch": "does not fit arch 'resnet34'",
      "missing_weights": "not found",
      "bad_size": "multiple of 32",
      "unknown_arch": "unknown arch",
      "prior_without_refinement": "needs refine_iters >= 1",
  }[case]
  if case == "unknown_layer":
    args += ["--layer", "layer7"]
  elif case == "unreadable_image":
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    args += ["--image", str(bad)]
  elif case == "missing_image":
    args += ["--image", str(tmp_path / "nope.jpg")]
  elif case == "weights_other_arch":
    args += ["--arch", "resnet34", "--weights", _resnet18_weights(tmp_path, ".pth")]
  elif case == "missing_weights":
    args += ["--weights", str(tmp_path / "none.safetensors")]
  elif case == "bad_size":
    args += ["--size", "50"]
  elif case == "unknown_arch":
    args += ["--arch", "resnet7"]
  elif case == "prior_without_refinement":
    args += ["--prior", "tv", "--refine", "0"]
  assert main(args) == 2
  assert expect in _one_error_line(capsys)
  assert not out.exists()
  assert _leftovers(tmp_path) == []


def test_weights_of_the_right_arch_are_used(tmp_path, image_file):
  out = tmp_path / "run"
  weights = _resnet18_weights(tmp_path, ".safetensors")
  args = ["invert", "--image", image_file, "--out", str(out), "--size", "64", "--layer", "maxpool",
          "--weights", weights, "--max-iters", "3", "--cg-iters", "3", "--refine", "0"]
  assert main(args) == 0
  m = json.loads((out / "metrics.json").read_text())
  assert m["weights"] == os.path.abspath(weights) and m["variant"] == "torchvision"
  assert [b["name"] for b in m["blocks"]] == ["stem"] and m["stem_method"] == "bounded"
  assert np.isfinite(m["psnr"])


def test_console_command_exit_status_and_stderr(tmp_path, image_file):
  """The installed entry point's module, as a process: usage errors are one line and exit 2 too."""
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  run = lambda *a: subprocess.run([sys.executable, "-m", "peel_jax.cli", *a], capture_output=True, text=True,
                                  env=env, timeout=120)
  p = run("invert", "--image", image_file, "--out", str(tmp_path / "o"), "--layer", "fc")
  assert p.returncode == 2
  assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "unknown layer 'fc'" in p.stderr
  p = run("invert", "--out", str(tmp_path / "o"))  # --image missing: argparse's error, one line too
  assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--image" in p.stderr
  p = run("frobnicate")
  assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_demo_runs_with_reduced_settings(tmp_path, monkeypatch, capsys):
  """The demo's code path, both networks (the full demo's time is measured in the README)."""
  from peel_jax import cli

  monkeypatch.setattr(cli, "DEMO_LAYERS", ("layer1", "layer2"))
  monkeypatch.setattr(cli, "DEMO_SIZE", 64)
  monkeypatch.setattr(cli, "DEMO_MAX_ITERS", 3)
  monkeypatch.setattr(cli, "DEMO_CG_ITERS", 3)
  monkeypatch.setattr(cli, "DEMO_REFINE", 2)
  monkeypatch.setattr(cli, "DEMO_REFINE_START", "blockwise")  # 'best' runs Mahendran-Vedaldi: tested elsewhere
  monkeypatch.setattr(cli, "DEMO_TV_LAYERS", ("maxpool",))
  monkeypatch.setattr(cli, "DEMO_TV_REFINE", 2)
  monkeypatch.setattr(cli, "DEMO_TV_MV_STEPS", 3)
  monkeypatch.setattr(cli, "DEMO_WORKERS", 2)
  out = tmp_path / "demo"
  assert main(["demo", "--out", str(out)]) == 0
  assert sorted(os.listdir(out)) == ["demo.png", "metrics.json"]
  m = json.loads((out / "metrics.json").read_text())
  assert set(m["layers"]) == {"layer1", "layer2"}
  assert m["layers"]["layer1"]["psnr"] > 30.0
  tv = m["torchvision"]["layers"]["maxpool"]
  # The verdict is the counts' (non-zero values behind the pool's ReLU against 64 x 64 x 3 pixel values). The TV
  # prior acted: the pool's distinct window maxima at the start are fewer than the pixel values whatever the
  # observation's count says (test_invert_network checks that rule bit for bit).
  assert tv["null_dim_bound"] == max(0, 64 * 64 * 3 - tv["informative_values"])
  assert tv["refine"]["with_prior"] is True
  text = capsys.readouterr().out
  assert "paper variant" in text and "scaled by 0.3" in text and "torchvision maxpool" in text
  assert "determined by count" in text
  assert main(["demo", "--out", str(out)]) == 2  # earlier results refused
  # Units side by side (two workers above) give what one at a time gives, bit for bit.
  monkeypatch.setattr(cli, "DEMO_WORKERS", 1)
  assert main(["demo", "--out", str(tmp_path / "demo1")]) == 0
  m1 = json.loads((tmp_path / "demo1" / "metrics.json").read_text())
  figures = lambda m: {(net, layer): (r["psnr"], r["observation_residual"], r["refine"]["with_prior"])
                       for net, layers in (("paper", m["layers"]), ("torchvision", m["torchvision"]["layers"]))
                       for layer, r in layers.items()}
  assert figures(m1) == figures(m)
