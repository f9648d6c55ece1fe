"""``peel-jax audit``: how much of the input does each split point of *your* network give away? One command, a report.

For a ResNet (architecture, variant, and your torchvision ``state_dict`` or a seeded random init) and a set of
images, the audit attacks every image from every chosen split point (default ``maxpool``, ``layer1`` ...
``layer4``) with the strongest attack of :mod:`peel_jax` (see :mod:`peel_jax.audit._attack`, the one place it is
called), optionally on features defended by :mod:`peel_jax.defences`, and writes to ``OUT/``:

* ``index.html``: self-contained (figures as base64 PNG; no external script, style or font). A verdict in words per
  split point with its thresholds cited (exact recovery: PSNR >= 58.9 dB, the error of rounding to 8 bits;
  recognisable: SSIM >= 0.3, He, Zhang and Lee 2019); a summary table per defence setting, one row per split
  point (median and min-max PSNR, SSIM and observation residual, how many images reproduce the observation,
  certificate statuses, seconds, and for defences the utility cost); the PSNR spread per split point; a grid of
  originals against reconstructions, one row per image and one column per split point, each cell with its own
  figures; the configuration and provenance (versions, weights digest, command line).
* ``metrics.csv``: one row per image x split point x defence setting (``method`` names the attack).
* ``summary.json``: what the tables show, plus the provenance.
* ``psnr.png``, ``grid.png`` (undefended) and ``grid-KIND-STRENGTH.png`` per defence.
* ``config.json`` and ``parts/``: the resumable run (:mod:`peel_jax.runs`). A killed audit resumes when rerun with
  the same options; a directory holding other results is refused unless ``--overwrite``.

Every image's figures are reported, never only an average: an image the attack could not make reproduce its
observation is flagged in the grid and counted in the table, and "not recognisable" is stated as what this attack
recovered, not as a guarantee.

Bad input (an unknown architecture, layer or defence; weights of another architecture; a folder without images;
an unreadable image) stops the audit with one line and exit status 2 before anything is written. Images of
another size are centre-cropped to a square and resized, and the report lists them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time

from peel_jax.audit._attack import Budget, attack
from peel_jax.audit._config import DEFAULT_LAYERS, AuditConfig, defence_id, parse_defence
from peel_jax.audit._summary import EXACT_PSNR, RECOGNISABLE_SSIM, verdict
from peel_jax.runs import BadConfig

__all__ = ["AuditConfig", "Budget", "BadConfig", "DEFAULT_LAYERS", "EXACT_PSNR", "RECOGNISABLE_SSIM", "add_parser",
           "attack", "command", "run_audit", "verdict"]

DEFAULT_LIMIT = 8


def add_parser(sub) -> None:
  """Adds the ``audit`` sub-command to the ``peel-jax`` sub-parsers ``sub``."""
  a = sub.add_parser("audit", help="leakage report of your network: every image attacked from every split point")
  a.add_argument("--arch", default="resnet18", help="architecture (resnet18, resnet34, resnet50, ...)")
  a.add_argument("--variant", default="torchvision", choices=("torchvision", "paper"),
                 help="torchvision (default) or paper (no BN, no post-add ReLU, no stem pool)")
  a.add_argument("--weights", help="torchvision state_dict (.pth/.pt/.safetensors); default: seeded random init")
  a.add_argument("--images", required=True,
                 help="bundled:faces (or bundled:natural|medical|digits), a folder of images, or one image file")
  a.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of 32; others are resized)")
  a.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="comma-separated split points")
  a.add_argument("--defence", default="none", metavar="KIND:STRENGTH[,...]",
                 help="also audit defended features: gaussian:SIGMA, quantize:BITS, dropout:P (comma-separated); "
                      "the undefended features are always audited beside them")
  a.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="audit the first N images")
  a.add_argument("--out", required=True, help="output directory")
  a.add_argument("--overwrite", action="store_true", help="replace an output directory holding other results")
  a.add_argument("--seed", type=int, default=0, help="seed of the random init, the defences and the attack")
  a.add_argument("--max-iters", type=int, default=30, help="LM iterations per block")
  a.add_argument("--cg-iters", type=int, default=20, help="CG iterations per LM step")
  a.add_argument("--refine", type=int, default=40, metavar="N", help="end-to-end refinement iterations (0: none)")
  a.add_argument("--no-certify", dest="certify", action="store_false", help="skip the whole-network certificate (certify_network)")
  a.add_argument("--batch-size", type=int, default=8, help="images attacked together (one saved part each)")


def _config(args, model) -> AuditConfig:
  from peel_jax.inversion.plan import invertible_layers
  from peel_jax.audit._config import check

  settings = ["none"]
  for spec in (s for s in args.defence.split(",") if s.strip()):
    sid = defence_id(*parse_defence(spec))
    if sid not in settings:
      settings.append(sid)
  config = AuditConfig(
      arch=args.arch, variant=args.variant, weights=None if args.weights is None else os.path.abspath(args.weights),
      seed=args.seed, images=args.images, size=args.size, limit=args.limit,
      layers=tuple(l.strip() for l in args.layers.split(",") if l.strip()), defences=tuple(settings),
      max_iters=args.max_iters, cg_iters=args.cg_iters, refine=args.refine, certify=args.certify,
      batch_size=args.batch_size)
  check(config, [l for l in invertible_layers(model) if l != "relu"])
  return config


def _command_line(config: AuditConfig, out: str) -> str:
  """The canonical ``peel-jax audit`` command that reproduces ``config`` into ``out``."""
  argv = ["peel-jax", "audit", "--arch", config.arch, "--variant", config.variant]
  if config.weights:
    argv += ["--weights", config.weights]
  argv += ["--images", config.images, "--size", str(config.size), "--layers", ",".join(config.layers)]
  if len(config.defences) > 1:
    argv += ["--defence", ",".join(config.defences[1:])]
  argv += ["--limit", str(config.limit), "--seed", str(config.seed), "--max-iters", str(config.max_iters),
           "--cg-iters", str(config.cg_iters), "--refine", str(config.refine), "--batch-size", str(config.batch_size)]
  return shlex.join(argv + ([] if config.certify else ["--no-certify"]) + ["--out", out])


def command(args) -> int:
  """Runs ``peel-jax audit`` from parsed arguments; returns 0. Raises :class:`BadConfig` on bad input."""
  from peel_jax import runs
  from peel_jax.audit import _inputs

  t0 = time.perf_counter()
  model = _inputs.get_model(args.arch, args.variant)
  config = _config(args, model)
  variables = _inputs.load_variables(model, config.arch, config.variant, config.weights, config.seed, config.size)
  digest = None if config.weights is None else _inputs.sha256_file(config.weights)
  imgs = _inputs.load_images(config.images, config.size, config.limit)
  config = dataclasses.replace(config, weights_sha256=digest, images_sha256=imgs.digest)
  cmd = _command_line(config, args.out)
  run = runs.Run(args.out, config, overwrite=args.overwrite, command=cmd)
  summary = run_audit(config, run, model, variables, imgs, cmd)
  print(f"wrote {os.path.join(run.out, 'index.html')} ({time.perf_counter() - t0:.0f} s)")
  for s in summary["settings"]:
    print(f"{s['label']}: {s['verdict']}")
  return 0


def run_audit(config: AuditConfig, run, model, variables, imgs, command_line: str = "") -> dict:
  """Attacks every unit not yet saved in ``run``, then writes the tables, figures and ``index.html``; returns the
  summary (see the module docstring)."""
  from peel_jax.audit import _pipeline, _write

  rows = _pipeline.run_units(config, run, model, variables, imgs.names, imgs.pixels)
  return _write.outputs(config, run, rows, imgs, command_line)
