"""``peel-jax audit``: every file written, a report a person can read, resumption per part, bad input refused."""

from __future__ import annotations

import csv
import html.parser
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peel_jax import images, models, port
from peel_jax._certify_network import STATUSES
from peel_jax.audit import _inputs, _summary
from peel_jax.cli import main

# Tiny and fast: 96 px, two split points, 2 LM iterations per block, no refinement.
FAST = ["--size", "96", "--layers", "maxpool,layer1", "--max-iters", "2", "--cg-iters", "3", "--refine", "0"]
OUTPUTS = ("config.json", "metrics.csv", "summary.json", "index.html", "psnr.png", "grid.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Two bundled photos as files: one already 96x96, one 80x80 (the audit resizes it and says so)."""
  root = tmp_path_factory.mktemp("faces")
  images.save_png(root / "a_astronaut.png", images.bundled("astronaut", 96))
  images.save_png(root / "b_grace_hopper.png", images.bundled("grace_hopper", 80))
  (root / "notes.txt").write_text("not an image, ignored")
  return str(root)


@pytest.fixture(scope="module")
def audited(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("audit") / "out")
  assert main(["audit", "--images", folder, "--out", out, *FAST]) == 0
  return out


class _Html(html.parser.HTMLParser):
  """Collects tables (class, rows of cells; a cell keeps its text and its images' src) and every src/href."""

  def __init__(self):
    super().__init__()
    self.tables, self.links, self.scripts = [], [], 0
    self._cell = None

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    self.links += [a[k] for k in ("src", "href") if k in a]
    if tag == "script":
      self.scripts += 1
    elif tag == "table":
      self.tables.append({"class": a.get("class"), "defence": a.get("data-defence"), "rows": []})
    elif tag == "tr" and self.tables:
      self.tables[-1]["rows"].append([])
    elif tag in ("td", "th") and self.tables:
      self._cell = {"tag": tag, "text": "", "imgs": []}
      self.tables[-1]["rows"][-1].append(self._cell)
    elif tag == "img" and self._cell is not None:
      self._cell["imgs"].append(a["src"])

  def handle_endtag(self, tag):
    if tag in ("td", "th"):
      self._cell = None

  def handle_data(self, data):
    if self._cell is not None:
      self._cell["text"] += data


def _read(path) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _parse(path) -> _Html:
  p = _Html()
  with open(path, encoding="utf-8") as f:
    p.feed(f.read())
  p.close()
  return p


def _rows(path) -> list[dict]:
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_audit_writes_every_output(audited):
  for name in OUTPUTS:
    assert os.path.isfile(os.path.join(audited, name)), name
  assert sorted(os.listdir(os.path.join(audited, "parts"))) == [
      "none__layer1__b0.json", "none__layer1__b0.npz", "none__maxpool__b0.json", "none__maxpool__b0.npz"]
  for png in ("psnr.png", "grid.png"):
    with open(os.path.join(audited, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  rows = _rows(os.path.join(audited, "metrics.csv"))
  assert sorted((r["image"], r["layer"]) for r in rows) == [
      ("a_astronaut.png", "layer1"), ("a_astronaut.png", "maxpool"),
      ("b_grace_hopper.png", "layer1"), ("b_grace_hopper.png", "maxpool")]
  for r in rows:
    assert r["method"] == "peel" and r["defence"] == "none"
    for k in ("psnr", "ssim", "mse", "observation_residual", "seconds"):
      assert np.isfinite(float(r[k])), (k, r)
    assert r["reproduces_observation"] == str(float(r["observation_residual"]) <= 1e-3)
    # The whole network's certificate at the reconstruction, with its evidence in words.
    assert r["certificate"] in STATUSES
    if r["certificate"] == "underdetermined":
      assert "informative observed values for 27648 pixel values" in r["certificate_detail"]
    else:  # a count along the path at the reconstruction, or the Lanczos ratio
      detail = r["certificate_detail"]
      assert "27648 pixel values at the reconstruction" in detail or "sigma_min / sigma_max <=" in detail, detail
  s = json.loads(_read(os.path.join(audited, "summary.json")))
  (setting,) = s["settings"]
  assert [l["layer"] for l in setting["layers"]] == ["maxpool", "layer1"]
  for lay in setting["layers"]:
    assert lay["verdict"] in _summary.VERDICTS and sum(lay["counts"].values()) == lay["images"] == 2
    assert lay["psnr"]["min"] <= lay["psnr"]["median"] <= lay["psnr"]["max"]
  assert s["provenance"]["table"]["weights"].startswith("none: seeded random init")
  assert "peel-jax audit" in s["provenance"]["command"]


def test_report_is_self_contained_with_a_summary_row_per_layer_and_an_image_per_grid_cell(audited):
  page = _parse(os.path.join(audited, "index.html"))
  assert page.scripts == 0
  assert page.links and all(link.startswith("data:image/png;base64,") for link in page.links)
  (summary,) = [t for t in page.tables if t["class"] == "summary"]
  header, *body = summary["rows"]
  assert [r[0]["text"] for r in body] == ["maxpool", "layer1"]
  statuses = {r["layer"]: [] for r in _rows(os.path.join(audited, "metrics.csv"))}
  for r in _rows(os.path.join(audited, "metrics.csv")):
    statuses[r["layer"]].append(r["certificate"])
  for row in body:  # the certificate column counts each image's status
    for status in set(statuses[row[0]["text"]]):
      assert f"{status}: {statuses[row[0]['text']].count(status)}" in row[6]["text"]
  assert "PSNR" in "".join(c["text"] for c in header)
  (grid,) = [t for t in page.tables if t["class"] == "grid"]
  header, *body = grid["rows"]
  assert [c["text"] for c in header] == ["image", "original", "maxpool", "layer1"]
  assert [r[0]["text"] for r in body] == ["a_astronaut.png", "b_grace_hopper.png"]
  for r in body:
    assert [len(c["imgs"]) for c in r] == [0, 1, 1, 1]
    assert all("PSNR" in c["text"] and "SSIM" in c["text"] for c in r[2:])
  text = _read(os.path.join(audited, "index.html"))
  assert "b_grace_hopper.png (80x80)" in text and "resized to 96x96" in text  # the report says which were resized
  assert "He, Zhang and Lee" in text and "58.9 dB" in text
  assert "randomly initialised weights" in text


def test_rerun_recomputes_only_the_removed_part(audited, folder, tmp_path, capsys):
  out = str(tmp_path / "copy")
  shutil.copytree(audited, out)  # copy2: modification times kept
  parts = os.path.join(out, "parts")
  removed = ("none__layer1__b0.json", "none__layer1__b0.npz")
  kept = {n: os.path.getmtime(os.path.join(parts, n)) for n in os.listdir(parts) if n not in removed}
  for n in removed:
    os.remove(os.path.join(parts, n))
  before = _rows(os.path.join(out, "metrics.csv"))
  assert main(["audit", "--images", folder, "--out", out, *FAST]) == 0
  err = capsys.readouterr().err
  assert "1 unit(s) already done" in err and "2/4 image x layer attacks done" not in err
  assert "4/4 image x layer attacks done (none, layer1)" in err
  assert {n: os.path.getmtime(os.path.join(parts, n)) for n in kept} == kept
  assert all(os.path.exists(os.path.join(parts, n)) for n in removed)
  after = _rows(os.path.join(out, "metrics.csv"))
  assert [(r["image"], r["layer"]) for r in after] == [(r["image"], r["layer"]) for r in before]
  for a, b in zip(after, before):
    assert float(a["psnr"]) == pytest.approx(float(b["psnr"]), abs=1e-3)


def test_other_results_are_refused_without_overwrite(audited, folder, capsys):
  before = {n: os.path.getmtime(os.path.join(audited, n)) for n in OUTPUTS}
  assert main(["audit", "--images", folder, "--out", audited, *FAST[:2], "--layers", "maxpool", *FAST[4:]]) == 2
  line = capsys.readouterr().err.strip()
  assert "\n" not in line and "differs in: layers" in line and "--overwrite" in line
  assert {n: os.path.getmtime(os.path.join(audited, n)) for n in OUTPUTS} == before


def test_sharded_over_two_devices_equals_one(audited, folder, tmp_path):
  # The child gets the single run's seeded random init as a weights file: the same values (the port is exact), without
  # compiling the init's random-number programs again (about 10 s of CPU).
  c = json.loads(_read(os.path.join(audited, "config.json")))["config"]
  assert c["weights"] is None
  variables = _inputs.load_variables(_inputs.get_model(c["arch"], c["variant"]), c["arch"], c["variant"], None,
                                     c["seed"], c["size"])
  weights = _save_torchvision(variables, c["arch"], str(tmp_path / "init.safetensors"))
  out = str(tmp_path / "sharded")
  args = ["audit", "--images", folder, "--out", out, *FAST[:2], "--layers", "maxpool", *FAST[4:], "--no-certify",
          "--weights", weights]
  code = (f"import sys, jax; from peel_jax.cli import main; assert jax.device_count() == 2; "
          f"sys.exit(main({args!r}))")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600, capture_output=True)
  assert json.loads(_read(os.path.join(out, "config.json")))["provenance"]["devices"] == 2
  sharded = _rows(os.path.join(out, "metrics.csv"))
  single = [r for r in _rows(os.path.join(audited, "metrics.csv")) if r["layer"] == "maxpool"]
  assert [r["image"] for r in sharded] == [r["image"] for r in single]
  for a, b in zip(sharded, single):
    assert float(a["psnr"]) == pytest.approx(float(b["psnr"]), abs=0.05)
    assert float(a["observation_residual"]) == pytest.approx(float(b["observation_residual"]), rel=1e-2)


def _save_torchvision(variables, arch: str, path: str) -> str:
  from safetensors.numpy import save_file

  save_file({k: np.ascontiguousarray(a) for k, a in port.to_torchvision(variables, arch).items()}, path)
  return path


def _weights_of(tmp_path, arch: str) -> str:
  # The architecture is told by the keys and shapes alone: zeros of the init's shapes, without running the init (an
  # eager resnet34 init compiles a program per op and weight shape, seconds of CPU).
  shapes = jax.eval_shape(models.get_model(arch).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  v = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  return _save_torchvision(v, arch, str(tmp_path / f"{arch}.safetensors"))


def _bad_case(case: str, tmp_path, folder) -> tuple[list[str], str]:
  if case == "weights of another architecture":
    return ["--images", folder, "--weights", _weights_of(tmp_path, "resnet34")], "it looks like a 'resnet34'"
  if case == "folder with no images":
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    return ["--images", str(tmp_path / "empty")], "no images in folder"
  if case == "unreadable image":
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "c_broken.jpg").write_bytes(b"not a jpeg at all")
    return ["--images", str(bad)], "unreadable image: cannot read"
  if case == "unknown layer":
    return ["--images", folder, "--layers", "layer1,layer9"], "unknown layer(s) layer9 for resnet18; valid layers:"
  if case == "unknown defence":
    return ["--images", folder, "--defence", "blur:1"], "unknown defence 'blur:1'"
  if case == "defence out of range":
    return ["--images", folder, "--defence", "dropout:1.5"], "defence 'dropout:1.5': channel dropout needs 0 <= p < 1"
  if case == "missing images":
    return ["--images", str(tmp_path / "nowhere")], "no such folder or file"
  if case == "unknown collection":
    return ["--images", "bundled:cats"], "unknown bundled collection 'cats'"
  assert case == "bad size"
  return ["--images", folder, "--size", "100"], "--size must be a positive multiple of 32"


BAD = ("weights of another architecture", "folder with no images", "unreadable image", "unknown layer",
       "unknown defence", "defence out of range", "missing images", "unknown collection", "bad size")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, folder, capsys):
  args, message = _bad_case(case, tmp_path, folder)
  out = tmp_path / "out"
  assert main(["audit", *args, "--out", str(out), "--max-iters", "2"]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("peel-jax: error: "), lines
  assert message in lines[0], lines[0]
  assert not out.exists()


def test_defence_is_reported_with_its_utility_cost(folder, tmp_path):
  out = str(tmp_path / "defended")
  args = ["--size", "96", "--layers", "layer1", "--max-iters", "2", "--cg-iters", "3", "--refine", "0",
          "--no-certify", "--limit", "1", "--defence", "gaussian:0.5"]
  assert main(["audit", "--images", folder, "--out", out, *args]) == 0
  rows = _rows(os.path.join(out, "metrics.csv"))
  assert [(r["defence"], r["layer"]) for r in rows] == [("none", "layer1"), ("gaussian:0.5", "layer1")]
  none, noisy = rows
  assert float(none["feature_distortion"]) == 0.0 and none["agrees_with_undefended"] == "True"
  assert float(noisy["feature_distortion"]) == pytest.approx(0.5, rel=0.25)  # noise-to-signal ratio, before clipping
  page = _parse(os.path.join(out, "index.html"))
  summaries = [t for t in page.tables if t["class"] == "summary"]
  assert [t["defence"] for t in summaries] == ["none", "gaussian:0.5"]
  assert "agrees with undefended prediction" in "".join(c["text"] for c in summaries[1]["rows"][0])
  assert os.path.isfile(os.path.join(out, "grid-gaussian-0.5.png"))


def test_verdict_thresholds():
  assert _summary.EXACT_PSNR == pytest.approx(58.92, abs=0.01)  # 10 log10(12 * 255^2)
  assert _summary.verdict(60.0, 0.2) == "exact recovery"
  assert _summary.verdict(25.0, 0.3) == "recognisable"
  assert _summary.verdict(25.0, 0.29) == "not recognisable"
  assert _summary.verdict(None, None) == "not recognisable"
  # A split point's verdict: the strongest leak reached by at least half its images.
  assert _summary.layer_verdict(["exact recovery", "not recognisable"]) == "exact recovery"
  assert _summary.layer_verdict(["exact recovery", "not recognisable", "not recognisable"]) == "not recognisable"
  assert _summary.layer_verdict(["recognisable", "exact recovery", "not recognisable"]) == "recognisable"
