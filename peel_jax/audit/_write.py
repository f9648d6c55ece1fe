"""The audit's outputs, rebuilt from the saved parts and each written atomically: ``metrics.csv``,
``summary.json``, ``psnr.png``, ``grid*.png`` and ``index.html``."""

from __future__ import annotations

import numpy as np

from peel_jax import runs
from peel_jax.audit import _attack, _pipeline, _report, _summary


def _atomic_bytes(path: str, data: bytes) -> None:
  def w(tmp):
    with open(tmp, "wb") as f:
      f.write(data)

  runs.atomic_write(path, w)


def _info(config, run, imgs, command_line: str) -> dict:
  """What the report says about the run: title, warnings, provenance table, command line, configuration."""
  prov = runs.provenance(command_line)
  weights = (f"{config.weights} (sha256 {config.weights_sha256})" if config.weights
             else f"none: seeded random init (seed {config.seed})")
  notes = []
  if not config.weights:
    notes.append("These are randomly initialised weights: the audit measures the architecture, not your trained "
                 "network. Pass --weights to audit the network you deploy.")
  resized = imgs.resized()
  if resized:
    listed = ", ".join(f"{n} ({h}x{w})" for n, (h, w) in resized[:6]) + (" ..." if len(resized) > 6 else "")
    notes.append(f"{len(resized)} of {len(imgs.names)} images were not {config.size}x{config.size}: each was "
                 f"centre-cropped to a square and resized to {config.size}x{config.size} ({listed}).")
  table = {
      "network": f"{config.arch} ({config.variant})", "weights": weights,
      "images": f"{imgs.source}: {len(imgs.names)} images at {config.size}x{config.size} (sha256 {imgs.digest})",
      "split points": ", ".join(config.layers), "defences": ", ".join(config.defences),
      "date (UTC)": prov["date"], "peel_jax": prov["peel_jax"], "jax": prov["jax"], "flax": prov["flax"],
      "numpy": prov["numpy"], "python": prov["python"],
      "devices": f"{prov['devices']} x {prov['device_kind']} ({prov['backend']}), {prov['processes']} process(es)",
  }
  return {"title": f"Leakage audit: {config.arch} ({config.variant})",
          "subtitle": (f"If you share a split point's output, how much of the input do you give away? "
                       f"{len(imgs.names)} images, {len(config.layers)} split points."),
          "notes": notes, "table": table, "command": command_line, "config": run._cfg, "provenance": prov}


def outputs(config, run, rows: list[dict], imgs, command_line: str) -> dict:
  """Writes every output from ``rows`` (process 0 only) and returns the summary."""
  budget = _attack.Budget(config.max_iters, config.cg_iters, config.refine, config.certify)
  n = len(imgs.names)
  summary = _summary.summarize(config, rows, _pipeline.unit_seconds(config, run, n), budget.describe())
  if not run.writer:
    return summary
  info = _info(config, run, imgs, command_line)
  runs.write_csv(run.path("metrics.csv"), rows)
  runs.write_json(run.path("summary.json"), runs.jsonable({**summary, "provenance": {
      k: info[k] for k in ("table", "command", "config", "provenance")}, "notes": info["notes"]}))
  recs = _pipeline.reconstructions(config, run, n)
  originals = np.round(imgs.pixels * 255).astype(np.uint8)
  psnr_png = _report.psnr_figure(summary, rows, config.layers)
  _atomic_bytes(run.path("psnr.png"), psnr_png)
  for setting in config.defences:
    name = "grid.png" if setting == "none" else f"grid-{setting.replace(':', '-')}.png"
    _atomic_bytes(run.path(name), _report.grid_figure(originals, recs, imgs.names, config.layers, setting))
  page = _report.page(summary, rows, originals, recs, imgs.names, config.layers, psnr_png, info)
  _atomic_bytes(run.path("index.html"), page.encode("utf-8"))
  return summary
