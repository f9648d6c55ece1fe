"""torchvision state_dict <-> Flax variables: formats, exact round trips, strict errors."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import torch_reference as tr
from peel_jax import models, port
from torch_reference import rel_err


def numpy_state_dict(sd) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def assert_same_variables(a, b):
  """Same tree, same dtypes, bit-identical leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def r18():
  """A randomised torch resnet18 (reference == torchvision layout) and its port."""
  return tr.ported_case("resnet18", "default")


@pytest.fixture
def sd18(r18):
  """A fresh numpy copy of its state_dict (with ``num_batches_tracked``), safe to mutate."""
  return numpy_state_dict(r18.state_dict)


# --- formats --------------------------------------------------------------------------------------------------------

FORMATS = ["pth_str", "pth_pathlike", "safetensors", "torch_mapping", "numpy_mapping", "wrapped_state_dict_file",
           "wrapped_state_dict_mapping", "wrapped_model_mapping"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats(fmt, r18, tmp_path):
  sd = r18.state_dict
  if fmt == "pth_str":
    torch.save(sd, tmp_path / "w.pth")
    source = str(tmp_path / "w.pth")
  elif fmt == "pth_pathlike":
    torch.save(sd, tmp_path / "w.pt")
    source = tmp_path / "w.pt"
  elif fmt == "safetensors":
    save_file({k: np.ascontiguousarray(v) for k, v in numpy_state_dict(sd).items()}, str(tmp_path / "w.safetensors"))
    source = tmp_path / "w.safetensors"
  elif fmt == "torch_mapping":
    source = sd
  elif fmt == "numpy_mapping":
    source = numpy_state_dict(sd)
  elif fmt == "wrapped_state_dict_file":
    torch.save({"epoch": 90, "best_acc1": 0.7, "state_dict": sd}, tmp_path / "checkpoint.pth")
    source = tmp_path / "checkpoint.pth"
  elif fmt == "wrapped_state_dict_mapping":
    source = {"epoch": 90, "state_dict": sd}
  else:
    source = {"model": sd, "optimizer": {}}
  assert_same_variables(port.from_torchvision(source, "resnet18"), r18.variables)


def test_num_batches_tracked_ignored(r18, sd18):
  assert any(k.endswith("num_batches_tracked") for k in sd18)
  without = {k: v for k, v in sd18.items() if not k.endswith("num_batches_tracked")}
  assert_same_variables(port.from_torchvision(without, "resnet18"), r18.variables)
  sd18["layer1.0.bn1.num_batches_tracked"] = np.array(12345)
  assert_same_variables(port.from_torchvision(sd18, "resnet18"), r18.variables)


def test_variables_layout(r18):
  """Kernels HWIO, dense (in, out), BatchNorm scale/bias/mean/var, float32."""
  p, s, sd = r18.variables["params"], r18.variables["batch_stats"], r18.state_dict
  np.testing.assert_array_equal(p["conv1"]["kernel"], sd["conv1.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["layer2_0"]["downsample_0"]["kernel"][0, 0],
                                sd["layer2.0.downsample.0.weight"].numpy()[:, :, 0, 0].T)
  np.testing.assert_array_equal(p["fc"]["kernel"], sd["fc.weight"].numpy().T)
  np.testing.assert_array_equal(p["layer3_1"]["bn2"]["scale"], sd["layer3.1.bn2.weight"].numpy())
  np.testing.assert_array_equal(s["layer2_0"]["downsample_1"]["var"], sd["layer2.0.downsample.1.running_var"].numpy())
  np.testing.assert_array_equal(s["bn1"]["mean"], sd["bn1.running_mean"].numpy())


# --- round trips ----------------------------------------------------------------------------------------------------

ROUND_TRIP_CASES = [("resnet18", "default"), ("resnet18", "preact"), ("resnet18", "preact_prelu_no_bn"),
                    ("resnet18", "small_stem"), ("resnet50", "paper_prelu")]


@pytest.mark.parametrize("arch,name", ROUND_TRIP_CASES, ids=[f"{a}-{n}" for a, n in ROUND_TRIP_CASES])
def test_round_trip_exact(arch, name):
  p = tr.ported_case(arch, name)
  variant = tr.VARIANTS[name]
  sd = port.to_torchvision(p.variables, arch, **variant)
  # to_torchvision gives back the torch state_dict itself, bit for bit, without num_batches_tracked.
  torch_sd = {k: v for k, v in numpy_state_dict(p.state_dict).items() if not k.endswith("num_batches_tracked")}
  assert sorted(sd) == sorted(torch_sd)
  for k in sd:
    assert sd[k].dtype == np.float32 and sd[k].flags["C_CONTIGUOUS"], k
    np.testing.assert_array_equal(sd[k], torch_sd[k], err_msg=k)
  assert_same_variables(port.from_torchvision(sd, arch, **variant), p.variables)


def test_to_torchvision_loads_into_torchvision(r18, photo):
  """The exported numpy arrays go straight into torch (``torch.from_numpy`` needs writable arrays)."""
  tv = tr.torchvision_model("resnet18")
  sd = port.to_torchvision(r18.variables, "resnet18")
  assert all(v.flags["WRITEABLE"] for v in sd.values())
  tv.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)  # num_batches_tracked optional
  _, logits = tr.torch_features(tv, photo, [])
  assert rel_err(r18.flax_feats["fc"], logits) < 1e-5


@pytest.mark.parametrize("arch", sorted(models.ARCHS))
def test_expected_keys_are_torchvision_keys(arch):
  with torch.device("meta"):  # shapes only: no memory, no init time
    tv = tr.torchvision_model(arch)
  want = {k: tuple(v.shape) for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
  assert port.expected_keys(arch) == want
  assert port.expected_keys(models.get_model(arch)) == want


def test_to_torchvision_errors(r18):
  params = {**r18.variables["params"], "extra": {"kernel": np.zeros((1, 1, 3, 3), np.float32)}}
  with pytest.raises(port.PortError, match=re.escape("variable params/extra/kernel has no torchvision key")):
    port.to_torchvision({**r18.variables, "params": params}, "resnet18")
  params = {k: v for k, v in r18.variables["params"].items() if k != "fc"}
  msg = "variables lack 2 entries of arch 'resnet18': fc.bias, fc.weight"
  with pytest.raises(port.PortError, match=re.escape(msg)):
    port.to_torchvision({**r18.variables, "params": params}, "resnet18")


# --- strict errors --------------------------------------------------------------------------------------------------


def test_port_error_is_value_error():
  assert issubclass(port.PortError, ValueError)


def test_missing_key(sd18):
  del sd18["layer3.1.conv2.weight"]
  with pytest.raises(port.PortError, match=re.escape("missing keys (1): layer3.1.conv2.weight")) as info:
    port.from_torchvision(sd18, "resnet18")
  assert "state_dict does not fit arch 'resnet18'" in str(info.value)
  assert "unexpected" not in str(info.value) and "looks like" not in str(info.value)


def test_unexpected_key(sd18):
  sd18["layer1.0.conv3.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(port.PortError, match=re.escape("unexpected keys (1): layer1.0.conv3.weight")) as info:
    port.from_torchvision(sd18, "resnet18")
  assert "missing" not in str(info.value)


def test_mis_shaped_keys(sd18):
  sd18["fc.weight"] = np.zeros((10, 512), np.float32)
  sd18["fc.bias"] = np.zeros((10,), np.float32)
  sd18["layer1.0.conv1.weight"] = sd18["layer1.0.conv1.weight"].transpose(2, 3, 0, 1).copy()  # HWOI, a common slip
  want = ("shape mismatches (3): fc.bias: expected (1000,), found (10,), fc.weight: expected (1000, 512), found (10, "
          "512), layer1.0.conv1.weight: expected (64, 64, 3, 3), found (3, 3, 64, 64)")
  with pytest.raises(port.PortError, match=re.escape(want)):
    port.from_torchvision(sd18, "resnet18")
  # ... and with the right num_classes the fc keys fit.
  with pytest.raises(port.PortError, match=re.escape("shape mismatches (1): layer1.0.conv1.weight")):
    port.from_torchvision(sd18, "resnet18", num_classes=10)


def test_wrong_arch_is_named():
  sd50 = tr.torchvision_model("resnet50").state_dict()
  with pytest.raises(port.PortError, match=re.escape("(it looks like a 'resnet50' state_dict)")) as info:
    port.from_torchvision(sd50, "resnet18")
  msg = str(info.value)
  assert "state_dict does not fit arch 'resnet18'" in msg
  # resnet18's keys are a subset of resnet50's: nothing is missing, the extra blocks and the shapes are reported.
  assert "missing keys" not in msg
  assert "unexpected keys (165): layer1.0.bn3.bias" in msg and "shape mismatches" in msg


def test_wrong_arch_with_same_keys_is_named():
  """wide_resnet50_2 has resnet50's keys with other shapes: the guess must use the shapes, not only the keys."""
  sd = {k: np.zeros(s, np.float32) for k, s in port.expected_keys("wide_resnet50_2").items()}
  with pytest.raises(port.PortError, match=re.escape("(it looks like a 'wide_resnet50_2' state_dict)")):
    port.from_torchvision(sd, "resnet50")
  with pytest.raises(port.PortError, match=re.escape("(it looks like a 'wide_resnet50_2' state_dict)")):
    port.from_torchvision(sd, "resnet18")


def test_missing_file(tmp_path):
  path = tmp_path / "nope.pth"
  with pytest.raises(FileNotFoundError, match=re.escape(f"weights file not found: {path}")):
    port.from_torchvision(path, "resnet18")
  with pytest.raises(FileNotFoundError, match="weights file not found"):
    port.from_torchvision(str(tmp_path / "nope.safetensors"), "resnet18")


def test_unreadable_file(tmp_path):
  path = tmp_path / "garbage.pth"
  path.write_bytes(b"not a torch pickle")
  with pytest.raises(port.PortError, match=re.escape(f"cannot read {str(path)!r} as a torch state_dict")):
    port.from_torchvision(path, "resnet18")


def test_not_a_mapping():
  with pytest.raises(port.PortError, match="a state_dict must be a mapping of name -> array, got list"):
    port.from_torchvision([np.zeros(3)], "resnet18")


@pytest.mark.parametrize("key,value", [("layer1.0.conv1.weight", np.nan), ("layer2.0.bn1.running_var", np.inf),
                                       ("fc.bias", -np.inf)])
def test_non_finite_weights(sd18, key, value):
  sd18[key].flat[3] = value
  with pytest.raises(port.PortError, match=re.escape(f"non-finite values in {key!r}")):
    port.from_torchvision(sd18, "resnet18")
