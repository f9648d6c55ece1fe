"""Markdown tables from finished runs: ``python -m experiments.tables OUT [OUT ...]`` (what RESULTS.md quotes).

Each ``OUT`` is a run directory (``OUT/config.json`` and ``OUT/summary.json``); the study is read from its recorded
command. Every number printed is copied from ``summary.json``; nothing is recomputed. A ``leakage_factors`` or
``defences`` summary written before those studies had a ``methods`` dimension is shown as method ``peel_blockwise``,
the only one they ran.
"""

from __future__ import annotations

import json
import os
import sys


def _load(out: str) -> tuple[dict, dict]:
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(out, "summary.json")) as f:
    return cfg, json.load(f)


def _f(v, fmt=".3g"):
  return "-" if v is None else format(v, fmt)


def toy_block(summary: dict) -> list[str]:
  lines = ["| gain | method | converged | input error median | worst | residual median | per-seed median error, "
           "mean +- std | paper metric % (median) | ms/image |", "|---|---|---|---|---|---|---|---|---|"]
  for g in summary["groups"]:
    e, r, p, s = g["input_rel_error"], g["residual"], g["paper_metric_percent"], g["per_seed_median_error"]
    lines.append(f"| {g['gain']:g} | {g['method']} | {g['converged']}/{g['images']} | {_f(e['median'], '.1e')} | "
                 f"{_f(e['max'], '.1e')} | {_f(r['median'], '.1e')} | {s['mean']:.2g} +- {s['std']:.2g} | "
                 f"{_f(p['median'])} | {1e3 * g['seconds_per_image']['median']:.3g} |")
  return lines


def attack(summary: dict) -> list[str]:
  lines = ["| method | layer | PSNR dB (median, min-max) | SSIM | MSE | observation residual | KNN distance | "
           "top-1 / top-5 | blocks converged | s/image |", "|---|---|---|---|---|---|---|---|---|---|"]
  for g in summary["groups"]:
    p = g["psnr"]
    conv = "-" if g["blocks_converged_fraction"] is None else f"{g['blocks_converged_fraction']:.2f}"
    lines.append(
        f"| {g['method']} | {g['layer']} | {p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | "
        f"{g['ssim']['median']:.3f} | {g['mse']['median']:.2e} | {g['observation_residual']['median']:.1e} | "
        f"{g['knn_distance']['median']:.3g} | {g['top1']:.2f} / {g['top5']:.2f} | {conv} | "
        f"{g['seconds_per_image']['median']:.0f} |")
  if summary.get("mse_ratios"):
    lines += ["", "| layer | method | median MSE / PEEL's |", "|---|---|---|"]
    lines += [f"| {r['layer']} | {r['method']} | {r['median_mse_over_peel']:.3g} |" for r in summary["mse_ratios"]]
  return lines


def _method(g: dict) -> str:
  """A group's method; summaries written before the studies had a ``methods`` dimension are block-wise only."""
  return g.get("method", "peel_blockwise")


def leakage_factors(summary: dict) -> list[str]:
  layers = list(dict.fromkeys(g["layer"] for g in summary["groups"]))
  lines = ["| method | setting | " + " | ".join(f"{l} PSNR (obs. residual)" for l in layers) + " |",
           "|---|---|" + "---|" * len(layers)]
  for method, setting in dict.fromkeys((_method(g), g["setting"]) for g in summary["groups"]):
    cells = []
    for l in layers:
      g = next(g for g in summary["groups"] if _method(g) == method and g["setting"] == setting and g["layer"] == l)
      cells.append(f"{g['psnr']['median']:.1f} ({g['observation_residual']['median']:.1e})")
    lines.append(f"| {method} | {setting} | " + " | ".join(cells) + " |")
  return lines


def defences(summary: dict) -> list[str]:
  lines = ["| method | defence | strength | layer | feature distortion | accuracy | agreement | PSNR (median) | SSIM | "
           "KNN distance |", "|---|---|---|---|---|---|---|---|---|---|"]
  for g in summary["groups"]:
    lines.append(f"| {_method(g)} | {g['defence']} | {g['strength']:g} | {g['layer']} | "
                 f"{g['feature_distortion']:.3g} | {g['accuracy']:.3f} | {g['agreement']:.3f} | "
                 f"{g['psnr']['median']:.1f} | {g['ssim']['median']:.3f} | {g['knn_distance']['median']:.3g} |")
  return lines


STUDIES = {"toy_block": toy_block, "faces": attack, "chest_xray": attack, "imagenet": attack,
           "leakage_factors": leakage_factors, "defences": defences}


def table(out: str) -> str:
  cfg, summary = _load(out)
  command = cfg["provenance"]["command"]
  study = command.split()[2].rpartition(".")[2] if command.startswith("python -m ") else None
  if study not in STUDIES:
    raise SystemExit(f"{out}: cannot tell the study from its command {command!r}")
  p = cfg["provenance"]
  head = [f"`{command}` ({p['date']}, {p['backend']} x{p['devices']}, jax {p['jax']}, peel_jax {p['peel_jax']})", ""]
  return "\n".join(head + STUDIES[study](summary))


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    print(__doc__.splitlines()[0], file=sys.stderr)
    return 2
  for out in argv:
    print(table(out) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
