"""From per-image rows to per-split-point figures and a verdict in words, each with its threshold cited."""

from __future__ import annotations

import math

import numpy as np

from peel_jax import runs
from peel_jax.audit._config import defence_label
from peel_jax.audit._pipeline import OBS_TOL

EXACT_PSNR = 10.0 * math.log10(12.0 * 255.0**2)
"""58.9 dB: the PSNR of rounding an image to 8 bits. A reconstruction at least this close is as close to the
original as the original's own 8-bit file is to the true intensities: an exact recovery."""

RECOGNISABLE_SSIM = 0.3
"""He, Zhang and Lee, "Model inversion attacks against collaborative inference", ACSAC 2019, treat a
reconstruction with SSIM below 0.3 as not recognisable."""

VERDICTS = ("exact recovery", "recognisable", "not recognisable")
THRESHOLDS = {
    "exact recovery": f"PSNR >= {EXACT_PSNR:.1f} dB (the error of rounding the image to 8 bits)",
    "recognisable": f"SSIM >= {RECOGNISABLE_SSIM} (He, Zhang and Lee, ACSAC 2019: below 0.3 is unrecognisable)",
    "not recognisable": f"SSIM < {RECOGNISABLE_SSIM} (He, Zhang and Lee, ACSAC 2019)",
    "reproduces the observation": f"relative observation residual <= {OBS_TOL:g}",
}


def verdict(psnr: float | None, ssim: float | None) -> str:
  """One image's verdict: ``'exact recovery'``, ``'recognisable'`` or ``'not recognisable'`` (see the thresholds)."""
  if psnr is not None and psnr >= EXACT_PSNR:
    return VERDICTS[0]
  if ssim is not None and ssim >= RECOGNISABLE_SSIM:
    return VERDICTS[1]
  return VERDICTS[2]


def layer_verdict(verdicts: list[str]) -> str:
  """The strongest leak reached by at least half the images (a privacy verdict errs towards the leak)."""
  ranks = sorted(VERDICTS.index(v) for v in verdicts)
  return VERDICTS[ranks[(len(ranks) - 1) // 2]] if ranks else VERDICTS[2]


def _float(v):
  return None if v is None or v == "" else float(v)


def _layer_summary(layer: str, rows: list[dict], seconds: float) -> dict:
  verdicts = [verdict(_float(r["psnr"]), _float(r["ssim"])) for r in rows]
  statuses = {}
  for r in rows:
    statuses[r["certificate"]] = statuses.get(r["certificate"], 0) + 1
  n = len(rows)
  return {
      "layer": layer, "images": n,
      **{k: runs.describe([_float(r[k]) for r in rows]) for k in ("psnr", "ssim", "mse", "observation_residual")},
      "reproduces_observation": sum(bool(r["reproduces_observation"]) for r in rows),
      "blocks_converged": sum(bool(r["blocks_converged"]) for r in rows),
      "counts": {v: verdicts.count(v) for v in VERDICTS},
      "verdict": layer_verdict(verdicts),
      "certificates": statuses,
      "seconds": seconds, "seconds_per_image": seconds / max(n, 1),
      "agreement": float(np.mean([bool(r["agrees_with_undefended"]) for r in rows])) if rows else None,
      "feature_distortion": runs.describe([_float(r["feature_distortion"]) for r in rows]),
      "refine_start": {s: sum(r["refine_start"] == s for r in rows) for s in sorted({r["refine_start"] for r in rows})},
  }


def verdict_text(setting: dict) -> str:
  """The verdict in words for one defence setting, split point by split point."""
  parts = []
  for lay in setting["layers"]:
    c = lay["counts"]
    n = lay["images"]
    detail = (f"{c['exact recovery']} of {n} exact, {c['exact recovery'] + c['recognisable']} of {n} "
              f"recognisable, median SSIM {_fmt(lay['ssim']['median'], '.2f')}, "
              f"median PSNR {_fmt(lay['psnr']['median'], '.1f')} dB")
    text = f"{lay['layer']}: {lay['verdict']} ({detail})"
    missed = n - lay["reproduces_observation"]
    if missed:
      text += (f"; the attack did not reproduce the observation for {missed} of {n} images, so a stronger attack "
               "may recover more")
    parts.append(text)
  return "; ".join(parts) + "."


def _fmt(v, spec: str) -> str:
  return "n/a" if v is None else format(v, spec)


def summarize(config, rows: list[dict], seconds: dict, attack: str) -> dict:
  """``summary.json``: per defence setting, per split point (in the order asked), the figures, counts and verdict."""
  settings = []
  for setting in config.defences:
    layers = []
    for layer in config.layers:
      sel = [r for r in rows if r["defence"] == setting and r["layer"] == layer]
      layers.append(_layer_summary(layer, sel, seconds.get((setting, layer), 0.0)))
    entry = {"defence": setting, "label": defence_label(setting), "layers": layers}
    entry["verdict"] = verdict_text(entry)
    settings.append(entry)
  return {"attack": attack, "thresholds": THRESHOLDS, "settings": settings,
          "note": ("'not recognisable' says what this attack recovered, not that no attack can: it is evidence, "
                   "not a guarantee of privacy.")}
