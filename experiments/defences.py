"""Defences against PEEL: leakage against utility, for noise, quantisation and channel dropout on shared features.

The paper leaves defences open. A client shares the output of ``--layers`` of a trained classifier, defended by
:mod:`peel_jax.defences` at a range of strengths; for each setting this study measures

* **leakage**: PSNR and SSIM of each of ``--methods``' reconstruction (:func:`peel_jax.invert_network`, the
  attacker inverting the defended features as if they were clean; where the observed layer ends in a ReLU the
  attacker first clips them at zero, which it knows to be valid), and the KNN distance in a separate evaluation
  network's features to the closest private image of the same class;
* **utility**: the server's accuracy when it finishes the forward pass from the defended features
  (:func:`peel_jax.blocks.forward_from`), and its agreement with the undefended prediction, on held-out images.

Both networks are trained here, offline, on ``--data`` (default scikit-learn's digits, upsampled to 48x48) by
:func:`experiments._training.train_classifier`: the target (``--arch``/``--variant``, the ImageNet stem) and an
evaluation network of the same architecture trained from another seed (the two share one compiled training step;
the evaluation network sees only reconstructions and private images, never the shared features). ``--weights``
replaces the target's training run with a torchvision ``state_dict`` (its ``fc`` must match the data's classes).
The curve (``tradeoff.png``) lets a practitioner pick the strength that stops the attack at an accuracy they can
afford.

Methods (both attack the same defended features: a setting's noise does not depend on the method):

* ``peel``: :func:`peel_jax.invert_network`'s default attack: the block-wise pass, then ``--peel-iters`` iterations
  towards an exact preimage from the better (by observation residual) of the block-wise and a Mahendran-Vedaldi
  estimate (``--mv-steps``), with the total-variation prior on the images the counts leave underdetermined.
* ``peel_blockwise``: the paper's attack alone: block by block, deepest first, nothing after.

``metrics.csv`` has a row per (method, defence, layer, image) and block; image rows carry the count bound on the
null space (``null_dim_bound``), and ``peel``'s the block-wise PSNR before the refinement, its start and whether
the prior acted. A unit of work is one (method, defence setting, layer). An output directory written before the
``methods`` dimension existed (block-wise only) is refused on resume: its ``config.json`` lacks the new fields.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import zlib

import numpy as np

from experiments import _harness as H


@dataclasses.dataclass(frozen=True)
class Config:
  """Config of the defences study.

  Default run (2 CPU cores: see experiments/RESULTS.md for its duration)::

      python -m experiments.defences          # writes experiments/results/defences

  Smallest run (the test's)::

      python -m experiments.defences --out /tmp/def --gaussian 0.5 --quantize 1 --dropout 0.5 --layers layer1 \\
          --images 1 --max-iters 2 --train-steps 2 --utility-images 16 --peel-iters 2 --mv-steps 3
  """

  out: str = dataclasses.field(default="experiments/results/defences", metadata={"help": "output directory"})
  data: str = dataclasses.field(default="bundled:digits", metadata={"help": "labelled images (bundled:NAME, folder)"})
  weights: str | None = dataclasses.field(default=None, metadata={
      "help": "the target classifier (torchvision state_dict); default: trained here on --data"})
  arch: str = dataclasses.field(default="resnet18", metadata={"help": "target architecture"})
  variant: str = dataclasses.field(default="paper", metadata={"help": "paper or torchvision"})
  size: int = dataclasses.field(default=48, metadata={
      "help": "image side (multiple of 16; 48 keeps every map at least 3x3: 2x2 maps are slow on CPU here)"})
  layers: tuple[str, ...] = dataclasses.field(default=("layer1", "layer2"), metadata={"help": "shared layers"})
  gaussian: tuple[float, ...] = dataclasses.field(default=(0.03, 0.1, 0.3, 1.0), metadata={
      "help": "noise-to-signal ratios"})
  quantize: tuple[float, ...] = dataclasses.field(default=(8, 4, 3, 2, 1), metadata={"help": "bits"})
  dropout: tuple[float, ...] = dataclasses.field(default=(0.1, 0.25, 0.5, 0.75), metadata={
      "help": "channel drop probabilities"})
  methods: tuple[str, ...] = H.methods_field()
  images: int = dataclasses.field(default=4, metadata={"help": "held-out images attacked"})
  utility_images: int = dataclasses.field(default=359, metadata={"help": "held-out images for accuracy"})
  max_iters: int = dataclasses.field(default=30, metadata={"help": "PEEL solver iterations per block"})
  cg_iters: int = dataclasses.field(default=20, metadata={"help": "CG iterations per LM step"})
  peel_iters: int = H.peel_iters_field()
  mv_steps: int = H.mv_steps_field()
  train_steps: int = dataclasses.field(default=200, metadata={"help": "Adam steps of each training run"})
  train_batch: int = dataclasses.field(default=16, metadata={"help": "images per Adam step of the training run"})
  seed: int = dataclasses.field(default=0, metadata={"help": "seed of training, defences and solvers"})

  def validate(self):
    if self.variant not in ("paper", "torchvision"):
      raise ValueError(f"unknown --variant {self.variant!r}")
    if self.size < 32 or self.size % 16:
      raise ValueError(f"--size must be a multiple of 16, at least 32, got {self.size}")
    for name in ("images", "utility_images", "max_iters", "cg_iters", "train_steps", "train_batch"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    H.validate_methods(self)
    if any(s < 0 for s in self.gaussian) or any(not 0 <= p < 1 for p in self.dropout):
      raise ValueError("--gaussian must be >= 0 and --dropout in [0, 1)")
    if any(b < 1 or int(b) != b for b in self.quantize):
      raise ValueError(f"--quantize takes integer bits >= 1, got {self.quantize}")

  def settings(self) -> list[tuple[str, float]]:
    return ([("none", 0.0)] + [("gaussian", s) for s in self.gaussian] + [("quantize", b) for b in self.quantize]
            + [("dropout", p) for p in self.dropout])


def _target_options(config: Config) -> dict:
  from peel_jax import models

  return models.paper_variant() if config.variant == "paper" else {}


def networks(config: Config, run: H.Run, ds, split) -> tuple:
  """``(target, target_vars, evaluator, eval_vars, stats)``: both classifiers, trained here (cached in ``OUT``)."""
  import jax
  import jax.numpy as jnp

  from experiments import _training
  from peel_jax import images, models, port

  classes = len(ds.label_names)
  x = images.normalize(ds.images)
  train_idx = split["train"]
  out = []
  stats = {}
  for role, seed in (("target", config.seed), ("evaluator", config.seed + 1)):
    arch, opts = config.arch, _target_options(config)
    model = models.get_model(arch, num_classes=classes, **opts)
    if role == "target" and config.weights is not None:
      try:
        variables = port.from_torchvision(config.weights, arch, num_classes=classes, **opts)
      except (port.PortError, OSError, ImportError) as e:
        raise H.BadConfig(f"cannot use --weights {config.weights!r}: {e}") from None
      st = {"weights": config.weights}
    else:
      init = model.init(jax.random.key(seed), jnp.asarray(x[:1]))
      train = functools.partial(_training.train_classifier, model, init, x[train_idx], ds.labels[train_idx],
                                key=jax.random.key(seed + 7), steps=config.train_steps,
                                batch_size=config.train_batch, holdout=0.0)
      variables, st = _training.cached_training(run.path(f"{role}.msgpack"), model, init, train)
    held = split["holdout"][:config.utility_images]
    st = {**st, "holdout_accuracy": _training.accuracy(model, variables, x[held], ds.labels[held]),
          "holdout_images": int(len(held))}
    stats[role] = st
    out += [model, variables]
  return (*out, stats)


def split_indices(n: int, seed: int, holdout: float = 0.2) -> dict:
  """A fixed train / held-out split of ``range(n)``."""
  perm = np.random.default_rng(seed).permutation(n)
  k = int(round(holdout * n))
  return {"holdout": np.sort(perm[:k]), "train": np.sort(perm[k:])}


def setting_id(kind: str, strength: float, layer: str) -> str:
  """A defence setting on one layer; it alone seeds the defence's noise, so every method sees the same features."""
  return f"{kind}-{strength:g}__{layer}"


def unit_id(method: str, kind: str, strength: float, layer: str) -> str:
  return f"{method}__{setting_id(kind, strength, layer)}"


def run(config: Config, run: H.Run) -> dict:
  import jax
  import jax.numpy as jnp

  import peel_jax
  from peel_jax import SolverConfig, data, defences, metrics
  from peel_jax import images as _images
  from peel_jax.blocks import forward_from

  try:
    ds = data.load_images(config.data, size=config.size)
  except (ValueError, OSError, ImportError) as e:
    raise H.BadConfig(f"cannot load --data {config.data!r}: {e}") from None
  split = split_indices(len(ds.images), config.seed)
  model, variables, evaluator, eval_vars, train_stats = networks(config, run, ds, split)
  valid = peel_jax.inversion.invertible_layers(model)
  bad = [l for l in config.layers if l not in valid or l in ("relu",)]
  if bad:
    raise H.BadConfig(f"unknown layer(s) {bad}; valid layers: {', '.join(v for v in valid if v != 'relu')}")
  x_all = _images.normalize(ds.images)
  attacked = split["holdout"][:config.images]
  util = split["holdout"][:config.utility_images]
  private = split["holdout"][:max(config.images, config.utility_images)]
  private_feats, _ = metrics.evaluation_embeddings(evaluator, eval_vars, jnp.asarray(x_all[private]))
  private_labels = ds.labels[private]
  solver = SolverConfig(max_iters=config.max_iters, cg_iters=config.cg_iters)
  ends_in_relu = model.post_activation and model.activation == "relu"
  units = [(m, k, s, l) for m in config.methods for k, s in config.settings() for l in config.layers]
  ids = [unit_id(*u) for u in units]
  todo = set(run.mine(ids))
  # Undefended features, computed once: of the held-out images for utility, of the attacked ones for leakage.
  x_util = jnp.asarray(x_all[util])
  h_util = peel_jax.features(model, variables, x_util, config.layers)
  clean_pred = {l: np.argmax(np.asarray(forward_from(model, variables, h_util[l], l)), -1) for l in config.layers}
  x, n = H.shard_batch(x_all[attacked], H.batch_mesh())
  feats = peel_jax.features(model, variables, x)
  for (method, kind, strength, layer), uid in H.progress(zip(units, ids), len(units), "defences"):
    if uid not in todo:
      continue
    sid = setting_id(kind, strength, layer)
    key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(sid.encode()) % (2**31))
    # Utility: the server's forward pass from defended features, on the held-out images.
    pred = np.argmax(np.asarray(forward_from(
        model, variables, defences.apply_defence(kind, strength, h_util[layer], key), layer)), -1)
    accuracy = float(np.mean(pred == ds.labels[util]))
    agreement = float(np.mean(pred == clean_pred[layer]))
    # Leakage: the method on the defended features of the attacked images.
    observed = defences.apply_defence(kind, strength, feats[layer], jax.random.fold_in(key, 1))
    if ends_in_relu:
      observed = jnp.maximum(observed, 0.0)
    t0 = time.perf_counter()
    x_hat, report = peel_jax.invert_network(model, variables, observed, layer, key=key,
                                            config=H.network_config(method, solver, config), true_features=feats,
                                            image=x)
    seconds = (time.perf_counter() - t0) / n
    x_hat = np.asarray(x_hat)[:n]
    rf, _ = metrics.evaluation_embeddings(evaluator, eval_vars, jnp.asarray(x_hat))
    knn = metrics.knn_distance(np.asarray(rf), np.asarray(private_feats), ds.labels[attacked], private_labels)
    clean_obs = np.asarray(feats[layer])[:n]
    distortion = float(np.linalg.norm(np.asarray(observed)[:n] - clean_obs) / np.linalg.norm(clean_obs))
    rows = []
    for i in range(n):
      base = {"method": method, "defence": kind, "strength": strength, "layer": layer, "image": int(attacked[i]),
              "name": ds.names[attacked[i]]}
      rows += H.block_rows(base, report, i)
      rows.append({**base, "block": "image", "psnr": float(report.psnr[i]), "ssim": float(report.ssim[i]),
                   "mse": float(report.mse[i]), "knn_distance": float(knn[i]),
                   "observation_residual": float(report.observation_residual[i]),
                   "feature_distortion": distortion, "accuracy": accuracy, "agreement": agreement,
                   **H.image_columns(report, i), "seconds_per_image": seconds})
    rec = _images.denormalize(x_hat)
    run.save(uid, rows, arrays={"reconstruction": np.round(np.clip(rec, 0, 1) * 255).astype(np.uint8)})
  rows = run.collect(ids)
  summary = summarize(config, rows, train_stats)
  if run.writer:
    H.write_csv(run.path("metrics.csv"), rows)
    H.write_json(run.path("summary.json"), summary)
    plot_tradeoff(run.path("tradeoff.png"), config, summary)
  return summary


def summarize(config: Config, rows: list[dict], train_stats: dict) -> dict:
  """Per (method, defence, strength, layer): utility, distortion, leakage distributions over images (``peel``: also
  the block-wise PSNR before the refinement), every image's PSNR."""
  groups = []
  for method in config.methods:
    for kind, strength in config.settings():
      for layer in config.layers:
        img = [r for r in rows if r["method"] == method and r["defence"] == kind and r["strength"] == strength
               and r["layer"] == layer and r["block"] == "image"]
        groups.append({
            "method": method, "defence": kind, "strength": strength, "layer": layer,
            "accuracy": img[0]["accuracy"], "agreement": img[0]["agreement"],
            "feature_distortion": img[0]["feature_distortion"],
            **{k: H.describe([r[k] for r in img]) for k in ("psnr", "ssim", "knn_distance", "observation_residual")},
            **H.refine_summary(img),
            "per_image_psnr": {r["name"]: r["psnr"] for r in img},
        })
  return {"target": config.weights or f"{config.arch} ({config.variant}), trained here",
          "training": train_stats, "groups": groups}


def plot_tradeoff(path: str, config: Config, summary: dict) -> None:
  """Per shared layer: median PSNR of each method against the server's accuracy, one curve per defence and method
  (colour: defence; solid: ``peel``, dashed: ``peel_blockwise``)."""
  fig = H.figure(4.4 * len(config.layers), 3.8)
  styles = {"peel": "o-", "peel_blockwise": "s--"}
  for li, layer in enumerate(config.layers):
    ax = fig.add_subplot(1, len(config.layers), li + 1)
    for ki, kind in enumerate(("gaussian", "quantize", "dropout")):
      for method in config.methods:
        of = [g for g in summary["groups"] if g["method"] == method and g["layer"] == layer]
        gs = [g for g in of if g["defence"] == "none"] + [g for g in of if g["defence"] == kind]
        acc = [g["accuracy"] for g in gs]
        psnr = [min(g["psnr"]["median"], 150.0) for g in gs]
        ax.plot(acc, psnr, styles[method], color=f"C{ki}", label=f"{kind}, {method}")
        for g, a, p in zip(gs[1:], acc[1:], psnr[1:]):
          ax.annotate(f"{g['strength']:g}", (a, p), fontsize=6)
    ax.set_xlabel("server accuracy with the defence")
    ax.set_ylabel("reconstruction PSNR dB (median)")
    ax.set_title(f"shared layer: {layer}", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  H.save_figure(fig, path)


def main(argv=None) -> int:
  return H.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
