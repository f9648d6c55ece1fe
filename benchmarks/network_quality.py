"""Whole-network leakage table: PSNR and per-stage input error from each stage output, per architecture variant.

    python -m benchmarks.network_quality --sizes 128 --out benchmarks/results/network_quality.json

Runs ``peel-jax invert`` (in-process, so compiled solvers are shared) for resnet18 in the torchvision variant (random
init) and the paper variant at He scale and with every branch's last conv scaled by 0.3, observed at ``layer1`` ...
``layer4`` of a bundled photo. Block-wise inversion only (no end-to-end refinement), the solver capped at
``--max-iters`` iterations per block. Writes the JSON and prints a markdown table whose "stage input error" columns
are the relative error of the recovered input of each stage's first block (``layerK.0``) and of the stem output.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from peel_jax import cli

VARIANTS = (("torchvision", 1.0), ("paper", 1.0), ("paper", 0.3))
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def run(sizes, max_iters: int, image: str, log=print) -> list[dict]:
  rows = []
  for size in sizes:
    for variant, gain in VARIANTS:
      for layer in LAYERS:
        with tempfile.TemporaryDirectory() as tmp:
          out = os.path.join(tmp, "run")
          argv = ["invert", "--arch", "resnet18", "--variant", variant, "--image", image, "--layer", layer,
                  "--size", str(size), "--out", out, "--branch-gain", str(gain), "--max-iters", str(max_iters)]
          t0 = time.perf_counter()
          rc = cli.main(argv)
          if rc != 0:
            raise RuntimeError(f"peel-jax {' '.join(argv)} exited {rc}")
          with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
        firsts = {b["name"]: b["input_rel_error"] for b in m["blocks"]}
        row = dict(size=size, variant=variant, branch_gain=gain, layer=layer, psnr=m["psnr"], ssim=m["ssim"],
                   seconds=time.perf_counter() - t0,
                   stage_input_error={k: v for k, v in firsts.items() if k.endswith(".0")},
                   blocks=m["blocks"])
        rows.append(row)
        log(f"{size} {variant} gain {gain} {layer}: PSNR {m['psnr']:.2f} dB, "
            + ", ".join(f"{k} {v:.2e}" for k, v in row["stage_input_error"].items()))
  return rows


def markdown(rows) -> str:
  lines = ["| size | variant | branch gain | observed | PSNR dB | SSIM | input error of layer1.0 / layer2.0 / layer3.0 / "
           "layer4.0 | s |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    errs = " / ".join(f"{r['stage_input_error'][f'layer{i}.0']:.1e}" if f"layer{i}.0" in r["stage_input_error"] else "-"
                      for i in range(1, 5))
    lines.append(f"| {r['size']} | {r['variant']} | {r['branch_gain']} | {r['layer']} | {r['psnr']:.1f} | "
                 f"{r['ssim']:.3f} | {errs} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[128])
  ap.add_argument("--max-iters", type=int, default=30)
  ap.add_argument("--image", default="grace_hopper")
  ap.add_argument("--out", default="benchmarks/results/network_quality.json")
  args = ap.parse_args(argv)
  rows = run(args.sizes, args.max_iters, args.image)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(rows, f, indent=1)
  os.replace(tmp, args.out)
  print(markdown(rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
