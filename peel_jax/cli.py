"""The ``peel-jax`` console command.

Sub-commands:

* ``peel-jax invert``: run a ResNet on an image up to a layer, invert that layer's output back to pixels with
  :func:`peel_jax.invert_network`, and write ``metrics.json``, ``reconstruction.png`` (original beside
  reconstruction), ``recovered.png`` (the reconstruction alone) and ``blocks.png`` (error per block) to ``--out``.
* ``peel-jax audit``: every image of a set attacked from every split point of your network, a self-contained
  ``index.html`` report with ``metrics.csv`` and ``summary.json`` (:mod:`peel_jax.audit`).
* ``peel-jax demo``: the attack on a bundled face photo from every stage output ``layer1`` .. ``layer4`` of a
  seeded random resnet18 (paper variant, residual branches scaled by 0.3), one figure and one ``metrics.json``.

Bad input (an unknown layer, an unreadable image, a weights file for another architecture, an output directory
holding earlier results without ``--overwrite``) gives one line on stderr and exit status 2, before any result is
written. Results are written to a temporary directory beside ``--out`` and moved into place at the end, so an
interrupted run leaves no half-written output.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

EXIT_BAD_INPUT = 2
VARIANTS = ("torchvision", "paper")
DEMO_LAYERS = ("layer1", "layer2", "layer3", "layer4")
DEMO_IMAGE = "grace_hopper"
DEMO_SIZE = 128
DEMO_SEED = 0
DEMO_GAIN = 0.3
DEMO_MAX_ITERS = 30
DEMO_CG_ITERS = 20
DEMO_REFINE = 40
DEMO_REFINE_START = "best"
# torchvision layer2 (21.1 dB; 200 s at load 3, a quarter of the demo) left out: the demo's time budget.
DEMO_TV_LAYERS = ("maxpool", "layer1")
DEMO_TV_REFINE = 200
DEMO_TV_MV_STEPS = 400
# Units (network, layer) run side by side: one XLA CPU program keeps about one core busy (README: the demo's time).
DEMO_WORKERS = 2
DEMO_EXPLANATION = (
    "demo: resnet18, paper variant (no BatchNorm, no post-add ReLU, no stem pool), random He weights (seed {seed}) "
    "with every residual branch's last conv scaled by {gain}: small branches that refine their input, as trained "
    "ones mostly do, under which a block's input is recovered exactly from its output (DESIGN.md: at this scale "
    "every start reached the true input of a paper block; at the plain He scale a block is not injective and no "
    "method can claim the input). Stride-2 blocks have fewer outputs than inputs: block-wise inversion returns a "
    "preimage, so each run is also refined end to end on the pixels (LM on the whole map pixels -> layer, no prior), "
    "starting per image from whichever of the block-wise estimate and a Mahendran-Vedaldi estimate (total-variation "
    "prior) reproduces the observation better (no such estimate is made where the block-wise pass already reproduces "
    "it to the solver's tolerance, as at layer1); where the counts leave the image underdetermined (layer4) the "
    "refinement seeks the exact preimage of least total variation. Beside it, the network people deploy: "
    "torchvision's resnet18 (BatchNorm, post-add ReLUs, a max-pool), random init, observed at {tv_layers}, where "
    "the counts leave every image underdetermined: the default attack ({tv_refine} iterations towards the smoothest "
    "exact preimage). Image: {image} at {size}x{size}."
)


_START_LABEL = {"blockwise": "block-wise start", "mahendran_vedaldi": "M-V start"}


class BadInput(Exception):
  """A user error: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse's own status), no usage dump
    raise BadInput(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="peel-jax", description="PEEL: rebuild a ResNet's input image from an intermediate output.")
  sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

  inv = sub.add_parser("invert", help="invert one layer's output of one image back to pixels")
  inv.add_argument("--arch", default="resnet18", help="architecture (resnet18, resnet34, resnet50, ...)")
  inv.add_argument("--variant", default="torchvision", choices=VARIANTS,
                   help="torchvision (default) or paper (no BN, no post-add ReLU, no stem pool)")
  inv.add_argument("--weights", help="torchvision state_dict (.pth/.pt/.safetensors); default: seeded random init")
  inv.add_argument("--image", required=True, help="image file, or a bundled photo name (astronaut, grace_hopper, ...)")
  inv.add_argument("--layer", default="layer2", help="observed layer: maxpool, layer1 .. layer4, layer2.1, ...")
  inv.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of 32)")
  inv.add_argument("--out", required=True, help="output directory")
  inv.add_argument("--overwrite", action="store_true", help="replace an output directory holding earlier results")
  inv.add_argument("--seed", type=int, default=0, help="seed of the random init and of the solver")
  inv.add_argument("--branch-gain", type=float, default=1.0,
                   help="scale every residual branch's last conv (kernel and bias) by this (1: as loaded/initialised)")
  inv.add_argument("--max-iters", type=int, default=None, help="solver iterations per block (default: the solver's)")
  inv.add_argument("--cg-iters", type=int, default=None, help="CG iterations per LM step (default: the solver's)")
  inv.add_argument("--driver", default="loop", choices=("loop", "scan"), help="block driver (loop: fastest on CPU)")
  from peel_jax.inversion.config import NetworkConfig  # light: no JAX computation at import

  default = NetworkConfig()
  inv.add_argument("--refine", type=int, default=default.refine_iters, metavar="N",
                   help="N iterations towards an exact preimage after the block-wise pass (default "
                        f"{default.refine_iters}; 0: the paper's block-wise attack alone)")
  inv.add_argument("--refine-start", default=default.refine_start, choices=("blockwise", "best"),
                   help="start of the refinement: the block-wise estimate, or per image the better (by observation "
                        f"residual) of it and a Mahendran-Vedaldi estimate (default {default.refine_start})")
  inv.add_argument("--prior", default=str(default.prior).lower(), choices=("none", "tv", "auto"),
                   help="prior of the refinement: none, tv (the smoothest exact preimage), or auto (tv where the "
                        f"counts leave the image underdetermined; default {str(default.prior).lower()})")
  inv.add_argument("--certify", action="store_true", help="report each block's determinacy (certify_block)")
  inv.add_argument("--certify-lanczos", type=int, default=32, metavar="K",
                   help="Lanczos steps of the network certificate (certify_network, always written to metrics.json "
                        "as 'network_certificate'); 0: the counts only")

  demo = sub.add_parser("demo", help="the attack on a bundled face photo, from every stage output")
  demo.add_argument("--out", default="peel-jax-demo", help="output directory (default: ./peel-jax-demo)")
  demo.add_argument("--overwrite", action="store_true", help="replace an output directory holding earlier results")

  from peel_jax.audit import add_parser as add_audit_parser  # (the audit's options live with the audit)

  add_audit_parser(sub)
  return p


# --- output directory -----------------------------------------------------------------------------------------------


def _check_out(out: str, overwrite: bool) -> None:
  if os.path.exists(out):
    if not os.path.isdir(out):
      raise BadInput(f"--out {out!r} exists and is not a directory")
    if os.listdir(out) and not overwrite:
      raise BadInput(f"output directory {out!r} already holds results; pass --overwrite to replace it")
  parent = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(parent):
    raise BadInput(f"parent directory of --out does not exist: {parent}")


def _staging(out: str) -> str:
  parent = os.path.dirname(os.path.abspath(out))
  return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-", dir=parent)


def _publish(tmp: str, out: str) -> None:
  """Moves the finished ``tmp`` directory to ``out`` (renames; an existing ``out`` is replaced as a whole)."""
  out = os.path.abspath(out)
  old = None
  if os.path.exists(out):
    old = f"{tmp}.old"
    os.replace(out, old)
  try:
    os.replace(tmp, out)
  except BaseException:
    if old is not None:
      os.replace(old, out)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: str, data: dict) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2, sort_keys=False, allow_nan=False)
    f.write("\n")


# --- model ----------------------------------------------------------------------------------------------------------


def _variant_options(variant: str) -> dict:
  from peel_jax import models

  return models.paper_variant() if variant == "paper" else {}


def scale_branches(variables: dict, gain: float, *, bn_bias: bool = True) -> dict:
  """Scales the last convolution (kernel and bias) of every residual branch by ``gain`` (Flax variables).

  With BatchNorm the scale goes on the last BatchNorm's ``scale`` and ``bias`` instead (the folded affine map is
  then scaled by ``gain``); ``bn_bias=False`` leaves that bias alone (``gain=0`` is then torchvision's
  ``zero_init_residual``).
  """
  if gain == 1.0:
    return variables
  import jax

  params = dict(variables["params"])
  for name, blk in params.items():
    if not name.startswith("layer"):
      continue
    blk = dict(blk)
    convs = sorted(k for k in blk if k.startswith("conv"))
    last = convs[-1]
    bn = "bn" + last[len("conv"):]
    target = bn if bn in blk else last
    if target == bn and not bn_bias:
      blk[target] = {**blk[target], "scale": gain * blk[target]["scale"]}
    else:
      blk[target] = jax.tree.map(lambda a: gain * a, dict(blk[target]))
    params[name] = blk
  return {**variables, "params": params}


def build_model(arch: str, variant: str, weights: str | None, seed: int, size: int):
  """``(model, variables)``; raises :class:`BadInput` for an unknown arch or unusable weights."""
  import jax
  import jax.numpy as jnp

  from peel_jax import models, port

  opts = _variant_options(variant)
  try:
    model = models.get_model(arch, **opts)
  except ValueError as e:
    raise BadInput(str(e)) from None
  if weights is None:
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3), jnp.float32))
    return model, {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  try:
    return model, port.from_torchvision(weights, arch, **opts)
  except (port.PortError, FileNotFoundError, ImportError, OSError) as e:
    raise BadInput(f"cannot use weights {weights!r}: {e}") from None


# --- figures --------------------------------------------------------------------------------------------------------


def _figure(w, h):
  from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas by default

  return Figure(figsize=(w, h), dpi=100)


def plot_reconstruction(path: str, original, recovered, title: str) -> None:
  fig = _figure(6.4, 3.6)
  for i, (img, name) in enumerate(((original, "original"), (recovered, "reconstruction"))):
    ax = fig.add_subplot(1, 2, i + 1)
    ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
    ax.set_title(name, fontsize=10)
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.savefig(path)


def plot_blocks(path: str, report) -> None:
  names = [b.name for b in report.blocks]
  x = np.arange(len(names))
  fig = _figure(max(4.0, 0.6 * len(names) + 2), 3.6)
  ax = fig.add_subplot(1, 1, 1)
  floor = 1e-9
  res = [max(float(np.mean(b.residual)), floor) for b in report.blocks]
  ax.plot(x, res, "o-", label="residual (vs its observation)")
  if all(b.input_rel_error is not None for b in report.blocks):
    err = [max(float(np.mean(b.input_rel_error)), floor) for b in report.blocks]
    ax.plot(x, err, "s-", label="input error (vs truth)")
  ax.set_yscale("log")
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
  ax.set_ylabel("relative error")
  ax.set_title(f"inversion from {report.layer}, deepest block first", fontsize=10)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


# --- commands -------------------------------------------------------------------------------------------------------


def _invert(args) -> int:
  _check_out(args.out, args.overwrite)
  if args.size < 32 or args.size % 32:
    raise BadInput(f"--size must be a positive multiple of 32, got {args.size}")
  if args.refine < 0:
    raise BadInput(f"--refine must be >= 0, got {args.refine}")
  if args.certify_lanczos < 0:
    raise BadInput(f"--certify-lanczos must be >= 0, got {args.certify_lanczos}")
  from peel_jax import images, models
  from peel_jax.inversion.plan import invertible_layers

  try:
    probe = models.get_model(args.arch, **_variant_options(args.variant))
  except ValueError as e:
    raise BadInput(str(e)) from None
  valid = invertible_layers(probe)
  if args.layer not in valid:
    raise BadInput(f"unknown layer {args.layer!r} for {args.arch}; valid layers: {', '.join(valid)}")
  try:
    img = images.load(args.image, args.size)
  except images.ImageError as e:
    raise BadInput(str(e)) from None
  model, variables = build_model(args.arch, args.variant, args.weights, args.seed, args.size)
  variables = scale_branches(variables, args.branch_gain)

  import jax
  import jax.numpy as jnp

  import peel_jax
  from peel_jax.solver.config import SolverConfig

  kw = {k: v for k, v in (("max_iters", args.max_iters), ("cg_iters", args.cg_iters)) if v is not None}
  try:
    config = SolverConfig(**kw).validate()
  except ValueError as e:
    raise BadInput(str(e)) from None
  x = jnp.asarray(images.normalize(img))[None]
  feats = peel_jax.features(model, variables, x)
  t0 = time.perf_counter()
  try:
    net = peel_jax.NetworkConfig(block=config, driver=args.driver, certify=args.certify, refine_iters=args.refine,
                                 refine_start=args.refine_start, prior=None if args.prior == "none" else args.prior)
    net.validate()
  except ValueError as e:
    raise BadInput(str(e)) from None
  x_hat, report = peel_jax.invert_network(
      model, variables, feats[args.layer], args.layer, config=net, key=jax.random.key(args.seed),
      true_features=feats, image=x, progress=sys.stderr.isatty())
  seconds = time.perf_counter() - t0
  certificate = peel_jax.certify_network(model, variables, feats[args.layer], args.layer, x_hat,
                                         key=jax.random.key(args.seed), lanczos_iters=args.certify_lanczos)
  recovered = images.denormalize(x_hat[0])
  metrics = report.to_dict()
  metrics["network_certificate"] = certificate.to_dict()
  metrics.update(
      arch=args.arch, variant=args.variant, layer=args.layer, size=args.size, seed=args.seed,
      weights=None if args.weights is None else os.path.abspath(args.weights),
      init="torchvision state_dict" if args.weights else f"random (flax default init, seed {args.seed})",
      branch_gain=args.branch_gain, image=args.image, seconds=seconds,
      solver={"max_iters": config.max_iters, "cg_iters": config.cg_iters, "refine_iters": net.refine_iters,
              "refine_start": net.refine_start, "prior": net.prior}, backend=jax.default_backend())
  tmp = _staging(args.out)
  try:
    _write_json(os.path.join(tmp, "metrics.json"), metrics)
    title = (f"{args.arch} ({args.variant}) from {args.layer}: PSNR {metrics['psnr']:.2f} dB, "
             f"SSIM {metrics['ssim']:.3f}")
    plot_reconstruction(os.path.join(tmp, "reconstruction.png"), img, recovered, title)
    images.save_png(os.path.join(tmp, "recovered.png"), recovered)
    plot_blocks(os.path.join(tmp, "blocks.png"), report)
    _publish(tmp, args.out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(report.summary())
  cert = metrics["network_certificate"]
  print(f"certificate from {args.layer}: {cert['status']} ({cert['informative_values']} informative values for "
        f"{cert['pixels']} pixel values; null-space dimension >= {cert['null_dim_bound']}; at the estimate, >= "
        f"{cert['path_null_dim_bound']} counted at {cert['path_layer']})")
  print(f"wrote {os.path.join(args.out, 'metrics.json')}, reconstruction.png, recovered.png, blocks.png")
  return 0


def _demo(args) -> int:
  _check_out(args.out, args.overwrite)
  import jax
  import jax.numpy as jnp

  import peel_jax
  from peel_jax import images, models
  from peel_jax.solver.config import SolverConfig

  explanation = DEMO_EXPLANATION.format(seed=DEMO_SEED, gain=DEMO_GAIN, image=DEMO_IMAGE, size=DEMO_SIZE,
                                        tv_layers=", ".join(DEMO_TV_LAYERS), tv_refine=DEMO_TV_REFINE)
  print(explanation, flush=True)
  img = images.bundled(DEMO_IMAGE, DEMO_SIZE)
  x = jnp.asarray(images.normalize(img))[None]
  paper = models.resnet18(**models.paper_variant())
  tv = models.resnet18()
  block = SolverConfig(max_iters=DEMO_MAX_ITERS, cg_iters=DEMO_CG_ITERS)
  paper_cfg = peel_jax.NetworkConfig(block=block, refine_iters=DEMO_REFINE, refine_start=DEMO_REFINE_START)
  tv_cfg = peel_jax.NetworkConfig(block=block, refine_iters=DEMO_TV_REFINE, mv_steps=DEMO_TV_MV_STEPS)
  nets = {  # name: (model, variables, layers, config)
      "paper": (paper, scale_branches(paper.init(jax.random.key(DEMO_SEED), x), DEMO_GAIN), DEMO_LAYERS, paper_cfg),
      "torchvision": (tv, tv.init(jax.random.key(DEMO_SEED), x), DEMO_TV_LAYERS, tv_cfg),
  }
  t_all = time.perf_counter()
  runs = _demo_runs(nets, x)
  seconds = time.perf_counter() - t_all
  configs = {name: {"layers": list(layers), "refine_iters": cfg.refine_iters, "refine_start": cfg.refine_start,
                    "mv_steps": cfg.mv_steps, "prior": cfg.prior} for name, (*_, layers, cfg) in nets.items()}
  metrics = {
      "description": explanation, "arch": "resnet18", "variant": "paper", "branch_gain": DEMO_GAIN,
      "image": DEMO_IMAGE, "size": DEMO_SIZE, "seed": DEMO_SEED, "seconds": seconds,
      "solver": {"max_iters": DEMO_MAX_ITERS, "cg_iters": DEMO_CG_ITERS, **configs["paper"]},
      "backend": jax.default_backend(),
      "layers": {layer: rep.to_dict() for layer, (*_, rep) in runs["paper"].items()},
      "torchvision": {"solver": configs["torchvision"],
                      "layers": {layer: rep.to_dict() for layer, (*_, rep) in runs["torchvision"].items()}},
  }
  tmp = _staging(args.out)
  try:
    _write_json(os.path.join(tmp, "metrics.json"), metrics)
    _demo_figure(os.path.join(tmp, "demo.png"), img, runs)
    _publish(tmp, args.out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"wrote {os.path.join(args.out, 'demo.png')} and metrics.json ({seconds:.0f} s)")
  return 0


def _verdict(report) -> str:
  bound = int(np.asarray(report.null_dim_bound)[0])
  return f"underdetermined (null >= {bound})" if bound else "determined by count"


def _demo_runs(nets: dict, x) -> dict:
  """``{name: {layer: (block-wise image, attack's image, report)}}`` for every (network, layer) unit of ``nets``,
  ``DEMO_WORKERS`` units at a time, the deepest (the longest) first, printing a line as each ends. Each unit is a
  pure function of its inputs, so the results do not depend on the order or the number of workers."""
  from concurrent.futures import ThreadPoolExecutor

  import peel_jax

  feats = {name: peel_jax.features(model, variables, x) for name, (model, variables, *_) in nets.items()}
  depth = ("layer4", "layer3", "layer2", "layer1", "maxpool", "relu")
  units = sorted(((name, layer) for name, (*_, layers, _) in nets.items() for layer in layers),
                 key=lambda u: depth.index(u[1]))
  progress = sys.stderr.isatty() and DEMO_WORKERS == 1
  with ThreadPoolExecutor(max_workers=DEMO_WORKERS) as pool:
    done = {u: pool.submit(_demo_unit, u[0], *nets[u[0]], feats[u[0]], u[1], x, progress) for u in units}
    return {name: {layer: done[(name, layer)].result() for layer in layers}
            for name, (*_, layers, _) in nets.items()}


def _demo_unit(name, model, variables, layers, config, feats, layer, x, progress) -> tuple:
  """``(block-wise image, attack's image, report)`` of one network observed at one layer; prints its line."""
  import jax

  import peel_jax
  from peel_jax import images

  x_hat, rep = peel_jax.invert_network(model, variables, feats[layer], layer, key=jax.random.key(DEMO_SEED),
                                       config=config, true_features=feats, image=x, progress=progress)
  print(f"{name} {layer}: block-wise PSNR {float(rep.refine.blockwise['psnr'][0]):.2f} dB, refined (from the "
        f"{rep.refine.start[0]} estimate{', TV prior' if rep.refine.with_prior[0] else ''}) PSNR "
        f"{float(rep.psnr[0]):.2f} dB, SSIM {float(rep.ssim[0]):.3f}, observation residual "
        f"{float(rep.observation_residual[0]):.1e}, {rep.seconds:.1f} s ({int(rep.informative_values[0])} "
        f"informative values for {int(np.prod(x.shape[1:]))} pixel values: {_verdict(rep)})", flush=True)
  return images.denormalize(rep.estimates["stem"][0]), images.denormalize(x_hat[0]), rep


def _demo_figure(path, img, runs: dict) -> None:
  """Rows: the paper variant block-wise, the paper variant refined, the torchvision network refined."""
  rows = [("paper", 0, "block-wise"), ("paper", 1, "refined"), ("torchvision", 1, "torchvision")]
  cols = 1 + max(len(r) for r in runs.values())
  fig = _figure(2.6 * cols, 2.8 * len(rows))
  ax = fig.add_subplot(len(rows), cols, 1)
  ax.imshow(img)
  ax.set_title("original", fontsize=9)
  ax.axis("off")
  for r, (name, which, label) in enumerate(rows):
    for c, (layer, run) in enumerate(runs[name].items()):
      rep = run[2]
      psnr = rep.refine.blockwise["psnr"] if which == 0 else rep.psnr
      how = label if which == 0 else f"{label}, {_START_LABEL[rep.refine.start[0]]}"
      ax = fig.add_subplot(len(rows), cols, r * cols + c + 2)
      ax.imshow(np.clip(run[which], 0, 1), interpolation="nearest")
      ax.set_title(f"{layer} {how}\nPSNR {float(psnr[0]):.1f} dB\n{_verdict(rep)}", fontsize=7)
      ax.axis("off")
  fig.suptitle(f"PEEL on resnet18: paper variant (branches x{DEMO_GAIN}; top two rows) and torchvision "
               "(BatchNorm, post-add ReLU, max-pool; bottom row), random init", fontsize=10)
  fig.savefig(path)


def _audit(args) -> int:
  from peel_jax.audit import BadConfig, command

  try:
    return command(args)
  except BadConfig as e:
    raise BadInput(str(e)) from None


def main(argv: list[str] | None = None) -> int:
  """Entry point of ``peel-jax``; returns the exit status (0 ok, 2 bad input)."""
  try:
    args = _parser().parse_args(argv)
    if args.command == "invert":
      return _invert(args)
    if args.command == "audit":
      return _audit(args)
    return _demo(args)
  except BadInput as e:
    print(f"peel-jax: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
  sys.exit(main())
