"""The attack study shared by ``faces``, ``chest_xray`` and ``imagenet``: PEEL against the baselines, from each stage.

For every observed layer and every method, a batch of private images is pushed through the target network to that
layer, and the method rebuilds the images from the output alone. Methods:

* ``peel``: our strongest attack, :func:`peel_jax.invert_network` with its default :class:`peel_jax.NetworkConfig`:
  the block-wise pass, then ``peel_iters`` iterations towards an exact preimage from the better (by observation
  residual) of the block-wise and the ``mahendran_vedaldi`` estimate, with the total-variation prior on the images
  the counts leave underdetermined (``prior='auto'``).
* ``peel_blockwise``: the paper's attack with our solver: block by block, deepest first, nothing after.
* ``peel_refined``: ``peel_blockwise`` followed by ``refine_iters`` iterations of prior-free end-to-end refinement on
  the pixels (it repairs what stride-2 blocks lose block-wise).
* ``peel_hybrid``: ``peel_refined`` started per image from whichever of the block-wise estimate and the
  ``mahendran_vedaldi`` estimate reproduces the observation better (the choice sees the observation only), with no
  prior.
* ``authors``: the same backward pass with the PEEL authors' own at-scale block solver
  (:func:`peel_jax.baselines.authors_penalty`: fixed quadratic penalty 1e2, Adam lr 0.01, ``authors_steps`` steps,
  ``p, n`` clamped at zero, start ``1e-3 N(0, I)``) in place of ours; a pooled stem is inverted by
  :func:`peel_jax.problems.stem.invert_stem` for both.
* ``mahendran_vedaldi``: Mahendran & Vedaldi (CVPR 2015), gradient inversion of the whole prefix with total
  variation and alpha-norm priors (:func:`peel_jax.baselines.mahendran_vedaldi`).

Metrics per image: MSE, PSNR, SSIM against the original (``[0, 1]`` pixels), the relative observation residual
``||f(x_hat) - f(x)|| / ||f(x)||`` (how well the reconstruction explains what was observed), and the
model-inversion community's KNN distance (squared L2 in an evaluation network's pooled features to the closest
private image of the same identity/class) and attack accuracy (top-1 / top-5 agreement of the evaluation network's
prediction on the reconstruction with its prediction on the original). Per block (``peel``, ``authors``): the
relative error of the recovered block input against the truth, the residual, iterations and the converged flag.
Nothing is averaged away: ``metrics.csv`` has one row per image and block, ``summary.json`` lists every
non-converged image by name.

The evaluation network is ``--eval-weights`` (a torchvision ``state_dict`` of ``--eval-arch``, e.g. a face or X-ray
classifier) when given; offline it is a seeded random torchvision ``resnet18``, whose features are a weak proxy (the
KNN distance then measures closeness in a random feature space, and attack accuracy agreement of a random
classifier): say which in any table.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from experiments import _harness as H

METHODS = ("peel", "peel_blockwise", "peel_refined", "peel_hybrid", "authors", "mahendran_vedaldi")
VARIANTS = ("paper", "torchvision")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Config of an attack study (``faces``, ``chest_xray`` and ``imagenet`` set other defaults)."""

  out: str = dataclasses.field(default="results/attack", metadata={"help": "output directory"})
  data: str = dataclasses.field(default="bundled:faces", metadata={
      "help": "bundled:faces|natural|medical|digits, an image folder root/CLASS/*.png, or tfds:NAME (needs TF)"})
  weights: str | None = dataclasses.field(default=None, metadata={
      "help": "the target's torchvision state_dict (.pth/.safetensors) of --arch/--variant; default seeded random"})
  arch: str = dataclasses.field(default="resnet18", metadata={"help": "target architecture"})
  variant: str = dataclasses.field(default="paper", metadata={
      "help": "paper (no BN, no post-add ReLU, no stem pool) or torchvision"})
  branch_gain: float = dataclasses.field(default=0.3, metadata={
      "help": "random init only: scale of every residual branch's last conv (1.0: He scale)"})
  size: int = dataclasses.field(default=96, metadata={"help": "image side (a multiple of 32)"})
  images: int = dataclasses.field(default=1, metadata={"help": "private images attacked (the first of --data)"})
  batch_size: int = dataclasses.field(default=4, metadata={"help": "images per unit of work"})
  layers: tuple[str, ...] = dataclasses.field(default=("layer1", "layer2", "layer3", "layer4"), metadata={
      "help": "observed layers"})
  methods: tuple[str, ...] = dataclasses.field(
      default=("peel", "peel_blockwise", "authors", "mahendran_vedaldi"), metadata={"help": f"of {METHODS}"})
  max_iters: int = dataclasses.field(default=30, metadata={"help": "PEEL solver iterations per block"})
  cg_iters: int = dataclasses.field(default=20, metadata={"help": "PEEL CG iterations per LM step"})
  peel_iters: int = H.peel_iters_field()
  refine_iters: int = dataclasses.field(default=40, metadata={
      "help": "end-to-end iterations of peel_refined and peel_hybrid"})
  authors_steps: int = dataclasses.field(default=1000, metadata={"help": "Adam steps per block, authors' solver"})
  mv_steps: int = dataclasses.field(default=400, metadata={
      "help": "gradient steps of mahendran_vedaldi (also the start of peel and peel_hybrid)"})
  eval_weights: str | None = dataclasses.field(default=None, metadata={
      "help": "evaluation network state_dict (KNN distance, attack accuracy); default seeded random"})
  eval_arch: str = dataclasses.field(default="resnet18", metadata={"help": "evaluation network architecture"})
  seed: int = dataclasses.field(default=0, metadata={"help": "seed of the random inits and solvers"})

  def validate(self):
    bad = [m for m in self.methods if m not in METHODS]
    if bad:
      raise ValueError(f"unknown method(s) {bad}; expected some of {METHODS}")
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown variant {self.variant!r}; expected one of {VARIANTS}")
    if self.size < 32 or self.size % 32:
      raise ValueError(f"--size must be a positive multiple of 32, got {self.size}")
    for name in ("images", "batch_size", "max_iters", "cg_iters", "authors_steps", "mv_steps", "peel_iters"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not self.layers:
      raise ValueError("--layers is empty")


def build_target(config: AttackConfig):
  """``(model, variables)`` of the target network (random init scaled by ``branch_gain``, or ``--weights``)."""
  from peel_jax import cli

  try:
    model, variables = cli.build_model(config.arch, config.variant, config.weights, config.seed, config.size)
  except cli.BadInput as e:
    raise H.BadConfig(str(e)) from None
  if config.weights is None:
    variables = cli.scale_branches(variables, config.branch_gain)
  return model, variables


def build_evaluator(config: AttackConfig):
  """``(model, variables)`` of the evaluation network (torchvision variant)."""
  from peel_jax import cli

  try:
    return cli.build_model(config.eval_arch, "torchvision", config.eval_weights, config.seed + 1, config.size)
  except cli.BadInput as e:
    raise H.BadConfig(f"evaluation network: {e}") from None


def load_data(config: AttackConfig):
  from peel_jax import data

  try:
    ds = data.load_images(config.data, size=config.size, limit=config.images)
  except (ValueError, OSError, ImportError) as e:
    raise H.BadConfig(f"cannot load --data {config.data!r}: {e}") from None
  if len(ds.images) == 0:
    raise H.BadConfig(f"--data {config.data!r} holds no images")
  return ds


def unit_id(method: str, layer: str, start: int) -> str:
  return f"{method}__{layer}__{start:05d}"


def _invert(method: str, config: AttackConfig, model, variables, observed, layer, image, key):
  """``(x_hat, report or None, observation residual)`` for one method on a (sharded) batch."""
  import peel_jax
  from peel_jax import SolverConfig
  from peel_jax.baselines import authors_penalty, mahendran_vedaldi

  solver = SolverConfig(max_iters=config.max_iters, cg_iters=config.cg_iters)
  if method == "mahendran_vedaldi":
    x_hat, info = mahendran_vedaldi(model, variables, observed, layer, key=key, steps=config.mv_steps)
    return x_hat, None, np.asarray(info.residual)
  if method in H.PEEL_METHODS:
    net = H.network_config(method, solver, config)
  else:
    kw = {"peel_refined": {"refine_iters": config.refine_iters},
          "peel_hybrid": {"refine_iters": config.refine_iters, "refine_start": "best", "mv_steps": config.mv_steps},
          "authors": {"block_solver": functools.partial(authors_penalty, steps=config.authors_steps)}}[method]
    net = peel_jax.NetworkConfig.blockwise(block=solver, **kw)
  x_hat, report = peel_jax.invert_network(model, variables, observed, layer, key=key, config=net, image=image)
  return x_hat, report, np.asarray(report.observation_residual)


def run(config: AttackConfig, run: H.Run, study: str) -> dict:
  """Runs (or resumes) the attack study into ``run``; returns the summary."""
  import jax
  import jax.numpy as jnp

  import peel_jax
  from peel_jax import images as _images
  from peel_jax import metrics

  ds = load_data(config)
  model, variables = build_target(config)
  valid = peel_jax.inversion.invertible_layers(model)
  bad = [l for l in config.layers if l not in valid]
  if bad:
    raise H.BadConfig(f"unknown layer(s) {bad}; valid layers: {', '.join(valid)}")
  eval_model, eval_vars = build_evaluator(config)
  x_all = _images.normalize(ds.images)
  private_feats, private_logits = metrics.evaluation_embeddings(eval_model, eval_vars, jnp.asarray(x_all))
  private_feats, private_logits = np.asarray(private_feats), np.asarray(private_logits)

  spans = H.batches(len(ds.images), config.batch_size)
  units = [(m, l, s) for m in config.methods for l in config.layers for s in spans]
  ids = [unit_id(m, l, s[0]) for m, l, s in units]
  todo = set(run.mine(ids))
  mesh = H.batch_mesh()
  for (method, layer, (a, b)), uid in H.progress(zip(units, ids), len(units), study):
    if uid not in todo:
      continue
    x, n = H.shard_batch(x_all[a:b], mesh)
    observed = peel_jax.features(model, variables, x, layer)[layer]
    key = jax.random.fold_in(jax.random.key(config.seed), a)
    t0 = time.perf_counter()
    x_hat, report, obs_res = _invert(method, config, model, variables, observed, layer, x, key)
    x_hat = np.asarray(jax.block_until_ready(x_hat))[:n]
    seconds = (time.perf_counter() - t0) / n
    rec = _images.denormalize(x_hat)
    im = metrics.image_metrics(rec, ds.images[a:b])
    feats, logits = metrics.evaluation_embeddings(eval_model, eval_vars, jnp.asarray(x_hat))
    knn = metrics.knn_distance(np.asarray(feats), private_feats, ds.labels[a:b], ds.labels)
    acc = metrics.attack_accuracy(private_logits[a:b], np.asarray(logits))
    rows = []
    for i in range(n):
      base = {"method": method, "layer": layer, "image": a + i, "name": ds.names[a + i],
              "label": ds.label_names[ds.labels[a + i]]}
      blocks_ok = True
      if report is not None:
        for blk in report.blocks:
          ok = bool(blk.converged[i])
          blocks_ok &= ok
          rows.append({**base, "block": blk.name,
                       "input_rel_error": None if blk.input_rel_error is None else float(blk.input_rel_error[i]),
                       "residual": float(blk.residual[i]), "iterations": int(blk.iterations[i]), "converged": ok})
      rows.append({**base, "block": "image", "mse": float(im["mse"][i]), "psnr": float(im["psnr"][i]),
                   "ssim": float(im["ssim"][i]), "observation_residual": float(obs_res[i]),
                   "knn_distance": float(knn[i]), "top1": bool(acc["top1_per_image"][i]),
                   "top5": bool(acc["top5_per_image"][i]), "all_blocks_converged": blocks_ok,
                   "seconds_per_image": seconds})
    run.save(uid, rows, arrays={"reconstruction": np.round(np.clip(rec, 0, 1) * 255).astype(np.uint8)})
  rows = run.collect(ids)
  summary = summarize(config, rows, study)
  if run.writer:
    H.write_csv(run.path("metrics.csv"), rows)
    H.write_json(run.path("summary.json"), summary)
    recs = {(m, l): np.concatenate([run.arrays(unit_id(m, l, s[0]))["reconstruction"] for s in spans])
            for m in config.methods for l in config.layers}
    plot_reconstructions(run.path("reconstructions.png"), config, ds, recs)
    plot_psnr(run.path("psnr_by_layer.png"), config, rows)
    plot_blocks(run.path("blocks.png"), config, rows)
  return summary


def summarize(config: AttackConfig, rows: list[dict], study: str) -> dict:
  """Per (method, layer): distributions over images, accuracies, non-converged images; MSE ratios vs ``peel``."""
  groups = []
  for method in config.methods:
    for layer in config.layers:
      img = [r for r in rows if r["method"] == method and r["layer"] == layer and r["block"] == "image"]
      blk = [r for r in rows if r["method"] == method and r["layer"] == layer and r["block"] != "image"]
      groups.append({
          "method": method, "layer": layer, "images": len(img),
          **{k: H.describe([r[k] for r in img]) for k in ("psnr", "ssim", "mse", "observation_residual",
                                                        "knn_distance", "seconds_per_image")},
          "top1": float(np.mean([r["top1"] for r in img])), "top5": float(np.mean([r["top5"] for r in img])),
          "blocks_converged_fraction": None if not blk else float(np.mean([r["converged"] for r in blk])),
          "images_not_converged": [r["name"] for r in img if not r["all_blocks_converged"]] if blk else None,
          "per_image_psnr": {r["name"]: r["psnr"] for r in img},
      })
  ratios = []
  if "peel" in config.methods:
    for layer in config.layers:
      ref = next(g for g in groups if g["method"] == "peel" and g["layer"] == layer)["mse"]["median"]
      for g in groups:
        if g["layer"] == layer and g["method"] != "peel" and ref:
          ratios.append({"layer": layer, "method": g["method"], "median_mse_over_peel": g["mse"]["median"] / ref})
  return {"study": study, "claim": "paper: PEEL's MSE about an order of magnitude below the baselines'",
          "evaluation_network": config.eval_weights or f"random {config.eval_arch} (seed {config.seed + 1})",
          "target": config.weights or f"random {config.arch} ({config.variant}), branch gain {config.branch_gain}",
          "groups": groups, "mse_ratios": ratios}


def plot_reconstructions(path: str, config: AttackConfig, ds, recs: dict, max_images: int = 3) -> None:
  """Per image (up to ``max_images``), a row per method: the original, then the reconstruction from each layer."""
  k = min(max_images, len(ds.images))
  rows, cols = k * len(config.methods), 1 + len(config.layers)
  fig = H.figure(1.5 * cols, 1.5 * rows + 0.4)
  for i in range(k):
    for mi, method in enumerate(config.methods):
      r = i * len(config.methods) + mi
      ax = fig.add_subplot(rows, cols, r * cols + 1)
      ax.imshow(ds.images[i], interpolation="nearest")
      ax.set_ylabel(method, fontsize=6)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title("original", fontsize=7)
      for li, layer in enumerate(config.layers):
        rec = recs[(method, layer)][i]
        ax = fig.add_subplot(rows, cols, r * cols + li + 2)
        ax.imshow(rec, interpolation="nearest")
        p = 10 * np.log10(1.0 / max(np.mean((rec / 255.0 - ds.images[i]) ** 2), 1e-20))
        ax.set_title(f"{layer} {p:.1f} dB" if r == 0 else f"{p:.1f} dB", fontsize=6)
        ax.axis("off")
  fig.tight_layout()
  H.save_figure(fig, path)


def plot_psnr(path: str, config: AttackConfig, rows: list[dict]) -> None:
  """Median PSNR per observed layer and method, with the range over images."""
  fig = H.figure(5.0, 3.6)
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(config.layers))
  for method in config.methods:
    v = [[r["psnr"] for r in rows if r["method"] == method and r["layer"] == l and r["block"] == "image"]
         for l in config.layers]
    v = [np.minimum(np.asarray(a, np.float64), 150.0) for a in v]
    med = np.array([np.median(a) for a in v])
    lo, hi = np.array([a.min() for a in v]), np.array([a.max() for a in v])
    ax.errorbar(x, med, yerr=[med - lo, hi - med], marker="o", capsize=3, label=method)
  ax.set_xticks(x)
  ax.set_xticklabels(config.layers)
  ax.set_ylabel("PSNR dB (median, range over images)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  H.save_figure(fig, path)


def plot_blocks(path: str, config: AttackConfig, rows: list[dict]) -> None:
  """Median relative input error per block, from the deepest observed layer, for each block-wise method."""
  layer = config.layers[-1]
  fig = H.figure(6.0, 3.6)
  ax = fig.add_subplot(1, 1, 1)
  for method in config.methods:
    blk = [r for r in rows if r["method"] == method and r["layer"] == layer and r["block"] != "image"]
    names = list(dict.fromkeys(r["block"] for r in blk))
    if not names:
      continue
    med = [np.median([r["input_rel_error"] for r in blk if r["block"] == nm]) for nm in names]
    ax.plot(range(len(names)), np.maximum(med, 1e-9), "o-", label=method)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("relative input error (median)")
  ax.set_title(f"per block, observed at {layer}, deepest first", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  H.save_figure(fig, path)
