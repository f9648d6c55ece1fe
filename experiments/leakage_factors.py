"""What modulates leakage: pooling, activation, initialisation, stride, BatchNorm and the post-add ReLU, one at a time.

The paper (arXiv 2504.06410, Sec. 6) ablates the stem's max-pool and the activation, and compares random with
pretrained weights. Here every factor is varied alone from one base network, and PEEL's leakage is measured from
each stage on the same images. The base is torchvision's resnet18 at random init with every residual branch's last
affine map scaled by ``--branch-gain`` (0.3: small branches that refine their input, as trained ones mostly do; see
DESIGN.md); at the plain He scale (``init=he``) a block's input is not determined and every factor's effect drowns
in the solver's failure to reach the observation, which was the first run's finding (experiments/RESULTS.md).

=================  ==========================================================================================
factor             settings (the base's first)
=================  ==========================================================================================
``pool``           the stem's 3x3/2 pooling: max, avg, none
``act``            every activation: relu, leaky_relu (slope 0.01), prelu (torch's 0.25 start), gelu
``init``           random with branches scaled (the base), random at the He scale (Flax's init, gain 1),
                   trained (a short optax run on ``--train-data``, or ``--weights``)
``stride``         the stem: 7x7 stride 2 + pool (ImageNet stem), or 3x3 stride 1, no pool (small-image stem)
``batch_norm``     on, off (convolutions then carry a bias)
``post_relu``      the activation after the residual addition: on, off
=================  ==========================================================================================

The trained network is trained here, offline: the base architecture with 10 classes, trained on scikit-learn's
digits (bundled, upsampled to 96x96) by :func:`experiments._training.train_classifier` (its held-out accuracy is in
``summary.json``), then attacked on ``--data`` at ``--size`` like every other setting. ``--weights`` replaces that
run with a torchvision ``state_dict`` of the base architecture.

Every (setting, layer) is attacked by each of ``--methods``:

* ``peel``: :func:`peel_jax.invert_network`'s default attack: the block-wise pass, then ``--peel-iters`` iterations
  towards an exact preimage from the better (by observation residual) of the block-wise and a Mahendran-Vedaldi
  estimate (``--mv-steps``), with the total-variation prior on the images the counts leave underdetermined.
* ``peel_blockwise``: the paper's attack alone: block by block, deepest first, nothing after.

Leakage is PSNR/SSIM/MSE of the rebuilt image, with the observation residual, the count bound on the null space
(``null_dim_bound``) and every block's input error and convergence in ``metrics.csv``; ``peel`` rows add the
block-wise PSNR before the refinement, its start and whether the prior acted. A unit of work is one (method,
setting, layer). An output directory written before the ``methods`` dimension existed (block-wise only) is refused
on resume: its ``config.json`` lacks the new fields.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import numpy as np

from experiments import _harness as H

SETTINGS: dict[str, dict] = {
    "base": {},
    "pool=avg": {"stem_pool": "avg"},
    "pool=none": {"stem_pool": "none"},
    "act=leaky_relu": {"activation": "leaky_relu"},
    "act=prelu": {"activation": "prelu"},
    "act=gelu": {"activation": "gelu"},
    "init=he": {},
    "init=trained": {},
    "stride=1": {"small_stem": True, "stem_pool": "none"},
    "batch_norm=off": {"batch_norm": False},
    "post_relu=off": {"post_activation": False},
}
"""Setting name -> model options changed from the base (``init=he`` and ``init=trained`` change the weights)."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Config of the leakage-factors study.

  Default run (2 CPU cores: see experiments/RESULTS.md for its duration)::

      python -m experiments.leakage_factors          # writes experiments/results/leakage_factors

  Smallest run (the test's)::

      python -m experiments.leakage_factors --out /tmp/lf --settings base,init=trained --size 32 \\
          --layers layer1 --images 1 --max-iters 2 --train-steps 2 --peel-iters 2 --mv-steps 3
  """

  out: str = dataclasses.field(default="experiments/results/leakage_factors", metadata={"help": "output directory"})
  data: str = dataclasses.field(default="bundled:faces", metadata={"help": "images attacked (bundled:NAME, folder)"})
  weights: str | None = dataclasses.field(default=None, metadata={
      "help": "trained weights of the base (torchvision state_dict) for init=trained; default: train here"})
  arch: str = dataclasses.field(default="resnet18", metadata={"help": "base architecture"})
  base_variant: str = dataclasses.field(default="torchvision", metadata={"help": "torchvision or paper"})
  settings: tuple[str, ...] = dataclasses.field(default=tuple(SETTINGS), metadata={"help": f"of {tuple(SETTINGS)}"})
  branch_gain: float = dataclasses.field(default=0.3, metadata={
      "help": "random inits (but init=he): scale of every residual branch's last affine map"})
  size: int = dataclasses.field(default=96, metadata={"help": "image side (multiple of 32)"})
  images: int = dataclasses.field(default=1, metadata={"help": "images attacked"})
  layers: tuple[str, ...] = dataclasses.field(default=("layer1", "layer2", "layer3", "layer4"), metadata={
      "help": "observed layers"})
  methods: tuple[str, ...] = H.methods_field()
  max_iters: int = dataclasses.field(default=15, metadata={"help": "solver iterations per block"})
  cg_iters: int = dataclasses.field(default=20, metadata={"help": "CG iterations per LM step"})
  peel_iters: int = H.peel_iters_field()
  mv_steps: int = H.mv_steps_field()
  train_data: str = dataclasses.field(default="bundled:digits", metadata={"help": "data of the training run"})
  train_size: int = dataclasses.field(default=96, metadata={
      "help": "image side of the training run (96: the ImageNet stem then keeps every map at least 3x3; smaller "
              "sizes reach 2x2 and 1x1 maps, which are pathologically slow on CPU here)"})
  train_steps: int = dataclasses.field(default=100, metadata={"help": "Adam steps of the training run"})
  train_batch: int = dataclasses.field(default=16, metadata={"help": "images per Adam step of the training run"})
  seed: int = dataclasses.field(default=0, metadata={"help": "seed of inits, training and solvers"})

  def validate(self):
    bad = [s for s in self.settings if s not in SETTINGS]
    if bad:
      raise ValueError(f"unknown setting(s) {bad}; expected some of {tuple(SETTINGS)}")
    if self.base_variant not in ("torchvision", "paper"):
      raise ValueError(f"unknown --base-variant {self.base_variant!r}")
    if self.size < 32 or self.size % 32:
      raise ValueError(f"--size must be a positive multiple of 32, got {self.size}")
    for name in ("images", "max_iters", "cg_iters", "train_steps", "train_size", "train_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    H.validate_methods(self)


def model_options(config: Config, setting: str) -> dict:
  from peel_jax import models

  base = models.paper_variant() if config.base_variant == "paper" else {}
  opts = {**base, **SETTINGS[setting]}
  if opts.get("small_stem"):
    opts["stem_pool"] = "none"
  return opts


def trained_variables(config: Config, run: H.Run) -> tuple[dict, dict]:
  """The base network's trained variables (``--weights``, or the cached short training run) and their stats."""
  import jax
  import jax.numpy as jnp

  from experiments import _training
  from peel_jax import data, images, models, port

  opts = model_options(config, "base")
  if config.weights is not None:
    try:
      return port.from_torchvision(config.weights, config.arch, **opts), {"weights": config.weights}
    except (port.PortError, OSError, ImportError) as e:
      raise H.BadConfig(f"cannot use --weights {config.weights!r}: {e}") from None
  try:
    ds = data.load_images(config.train_data, size=config.train_size)
  except (ValueError, OSError, ImportError) as e:
    raise H.BadConfig(f"cannot load --train-data {config.train_data!r}: {e}") from None
  classes = len(ds.label_names)
  model = models.get_model(config.arch, num_classes=classes, **opts)
  x = images.normalize(ds.images)
  init = model.init(jax.random.key(config.seed), jnp.asarray(x[:1]))
  key = jax.random.key(config.seed + 7)
  train = functools.partial(_training.train_classifier, model, init, x, ds.labels, key=key,
                            steps=config.train_steps, batch_size=config.train_batch)
  variables, stats = _training.cached_training(run.path("trained.msgpack"), model, init, train)
  stats = {**stats, "data": config.train_data, "size": config.train_size, "classes": classes}
  return variables, stats


def build(config: Config, setting: str, trained: dict | None):
  """``(model, variables)`` of one setting (random init of its own seed, or the trained base)."""
  import jax
  import jax.numpy as jnp

  from peel_jax import models

  opts = model_options(config, setting)
  if setting == "init=trained":
    classes = trained["params"]["fc"]["bias"].shape[0]
    return models.get_model(config.arch, num_classes=classes, **opts), trained
  from peel_jax.cli import scale_branches

  model = models.get_model(config.arch, **opts)
  variables = model.init(jax.random.key(config.seed), jnp.zeros((1, config.size, config.size, 3), jnp.float32))
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  return model, scale_branches(variables, 1.0 if setting == "init=he" else config.branch_gain)


def unit_id(method: str, setting: str, layer: str) -> str:
  return f"{method}__{setting.replace('=', '-')}__{layer}"


def run(config: Config, run: H.Run) -> dict:
  import jax

  import peel_jax
  from peel_jax import SolverConfig, data
  from peel_jax import images as _images

  try:
    ds = data.load_images(config.data, size=config.size, limit=config.images)
  except (ValueError, OSError, ImportError) as e:
    raise H.BadConfig(f"cannot load --data {config.data!r}: {e}") from None
  # Setting outermost: each setting's network is built once for all its methods and layers.
  units = [(m, s, l) for s in config.settings for m in config.methods for l in config.layers]
  ids = [unit_id(*u) for u in units]
  todo = set(run.mine(ids))
  trained, train_stats = (None, None)
  if "init=trained" in config.settings:
    trained, train_stats = trained_variables(config, run)
  x_all = _images.normalize(ds.images)
  solver = SolverConfig(max_iters=config.max_iters, cg_iters=config.cg_iters)
  x, n = H.shard_batch(x_all, H.batch_mesh())
  built = {}
  for (method, setting, layer), uid in H.progress(zip(units, ids), len(units), "leakage_factors"):
    if uid not in todo:
      continue
    if setting not in built:  # the network of one setting and its features, kept for that setting's units
      model, variables = build(config, setting, trained)
      built = {setting: (model, variables, peel_jax.features(model, variables, x))}
    model, variables, feats = built[setting]
    t0 = time.perf_counter()
    x_hat, report = peel_jax.invert_network(model, variables, feats[layer], layer, key=jax.random.key(config.seed),
                                            config=H.network_config(method, solver, config), true_features=feats,
                                            image=x)
    seconds = (time.perf_counter() - t0) / n
    rows = []
    for i in range(n):
      base = {"method": method, "setting": setting, "factor": setting.partition("=")[0], "layer": layer, "image": i,
              "name": ds.names[i]}
      rows += H.block_rows(base, report, i)
      rows.append({**base, "block": "image", "psnr": float(report.psnr[i]), "ssim": float(report.ssim[i]),
                   "mse": float(report.mse[i]), "observation_residual": float(report.observation_residual[i]),
                   "all_blocks_converged": bool(all(b.converged[i] for b in report.blocks[:-1])),
                   **H.image_columns(report, i), "seconds_per_image": seconds})
    rec = _images.denormalize(np.asarray(x_hat)[:n])
    run.save(uid, rows, arrays={"reconstruction": np.round(np.clip(rec, 0, 1) * 255).astype(np.uint8)})
  rows = run.collect(ids)
  summary = summarize(config, rows, train_stats)
  if run.writer:
    H.write_csv(run.path("metrics.csv"), rows)
    H.write_json(run.path("summary.json"), summary)
    plot_factors(run.path("factors.png"), config, rows)
    plot_grid(run.path("reconstructions.png"), config, ds, {u: run.arrays(u)["reconstruction"] for u in ids})
  return summary


def summarize(config: Config, rows: list[dict], train_stats: dict | None) -> dict:
  """Per (method, setting, layer): distributions over images (``peel``: also the block-wise PSNR before the
  refinement), the blocks' convergence, every image's PSNR."""
  groups = []
  for method in config.methods:
    for setting in config.settings:
      for layer in config.layers:
        unit = [r for r in rows if r["method"] == method and r["setting"] == setting and r["layer"] == layer]
        img = [r for r in unit if r["block"] == "image"]
        blk = [r for r in unit if r["block"] not in ("image", "stem")]
        groups.append({
            "method": method, "setting": setting, "layer": layer,
            **{k: H.describe([r[k] for r in img]) for k in ("psnr", "ssim", "mse", "observation_residual")},
            **H.refine_summary(img),
            "blocks_converged_fraction": float(np.mean([r["converged"] for r in blk] or [1])),
            "per_image_psnr": {r["name"]: r["psnr"] for r in img},
        })
  return {"base": f"{config.arch} ({config.base_variant}), random init seed {config.seed}, branches scaled by "
                  f"{config.branch_gain}",
          "training": train_stats, "groups": groups}


def plot_factors(path: str, config: Config, rows: list[dict]) -> None:
  """Median PSNR per setting (bars), one group of bars per observed layer, one panel per method (one above the
  other, on a shared PSNR axis)."""
  fig = H.figure(max(6.0, 0.5 * len(config.settings) * len(config.layers) + 2), 4.0 * len(config.methods))
  w = 0.8 / len(config.settings)
  ax = None
  for mi, method in enumerate(config.methods):
    ax = fig.add_subplot(len(config.methods), 1, mi + 1, sharey=ax)
    for si, setting in enumerate(config.settings):
      med = [np.median([r["psnr"] for r in rows if r["method"] == method and r["setting"] == setting
                        and r["layer"] == l and r["block"] == "image"]) for l in config.layers]
      ax.bar(np.arange(len(config.layers)) + si * w, np.minimum(med, 150.0), w, label=setting)
    ax.set_xticks(np.arange(len(config.layers)) + 0.4 - w / 2)
    ax.set_xticklabels(config.layers)
    ax.set_ylabel("PSNR dB (median over images)")
    ax.set_title(f"{method}: leakage by factor, {config.arch} ({config.base_variant} base), "
                 f"{config.size}x{config.size}", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  H.save_figure(fig, path)


def plot_grid(path: str, config: Config, ds, recs: dict) -> None:
  """The first image's reconstruction per setting and method (rows) and layer (columns)."""
  pairs = [(s, m) for s in config.settings for m in config.methods]
  rows, cols = len(pairs), 1 + len(config.layers)
  fig = H.figure(1.4 * cols, 1.4 * rows + 0.3)
  for ri, (setting, method) in enumerate(pairs):
    ax = fig.add_subplot(rows, cols, ri * cols + 1)
    ax.imshow(ds.images[0])
    ax.set_ylabel(f"{setting}\n{method}", fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])
    for li, layer in enumerate(config.layers):
      ax = fig.add_subplot(rows, cols, ri * cols + li + 2)
      ax.imshow(recs[unit_id(method, setting, layer)][0])
      ax.axis("off")
      if ri == 0:
        ax.set_title(layer, fontsize=7)
  fig.tight_layout()
  H.save_figure(fig, path)


def main(argv=None) -> int:
  return H.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
