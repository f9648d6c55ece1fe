"""The paper's toy study: one 5-channel residual block on 8x8 images, many random blocks, mean and spread.

PEEL (arXiv 2504.06410) first shows its attack on a single paper block ``y = x + A2(relu(A1 x))`` with 5 channels at
8x8, solved by PyGRANSO, and reports a recovery error of "1.14%". That figure is ``100 * ||x - x_hat|| / numel(x)``,
not a relative error (with ``numel(x) = 320`` it makes a 12% relative error look like 0.9%); this study reports the
true relative error ``||x_hat - x|| / ||x||`` beside it, and the relative residual ``||block(x_hat) - y|| / ||y||``.

Inputs are 8x8 images (default: scikit-learn's digits, bundled in its wheel), ImageNet-normalised and lifted to 5
non-negative channels by a random He 3x3 convolution and a ReLU (the toy block's input is a ReLU feature map, so
``x >= 0`` is known). Each seed draws a new block (He-normal weights, the last conv scaled by each ``gain``: 1.0 is
the He scale, 0.3 a contractive branch) and a new lift. Methods: ``peel`` (:func:`peel_jax.invert_block`, default
config), ``authors`` (the authors' at-scale solver, :func:`peel_jax.baselines.authors_penalty`: penalty 1e2, Adam
lr 0.01, 1000 steps) and ``fixed_point`` (the invertible-ResNet iteration ``x <- y - F(x)`` from ``y``). PyGRANSO
itself runs outside this harness (``benchmarks/pygranso_reference.py``: it needs its own environment and minutes
per image).

``--weights`` takes a block saved from torch (``.npz``, ``.pth`` or ``.safetensors`` holding ``conv1.weight``
``(5, 5, 3, 3)``, ``conv1.bias``, ``conv2.weight``, ``conv2.bias`` in torch's OIHW layout); every seed then uses
that block (gain still scales its last conv) and only the lift and images change.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from experiments import _harness as H

METHODS = ("peel", "authors", "fixed_point")


@dataclasses.dataclass(frozen=True)
class Config:
  """Config of the toy-block study.

  Default run (2 CPU cores: about 2 minutes)::

      python -m experiments.toy_block          # writes experiments/results/toy_block

  Smallest run (the test's)::

      python -m experiments.toy_block --out /tmp/toy --seeds 2 --images 2 --authors-steps 50
  """

  out: str = dataclasses.field(default="experiments/results/toy_block", metadata={"help": "output directory"})
  data: str = dataclasses.field(default="bundled:digits", metadata={
      "help": "8x8-class images: bundled:digits, another bundled:NAME, or an image folder (resized to --size)"})
  weights: str | None = dataclasses.field(default=None, metadata={
      "help": "a torch-layout paper block (conv1.weight, conv1.bias, conv2.weight, conv2.bias); default random"})
  size: int = dataclasses.field(default=8, metadata={"help": "image side"})
  channels: int = dataclasses.field(default=5, metadata={"help": "block channels (the paper's toy: 5)"})
  seeds: int = dataclasses.field(default=10, metadata={"help": "number of random blocks"})
  images: int = dataclasses.field(default=8, metadata={"help": "images per block"})
  gains: tuple[float, ...] = dataclasses.field(default=(1.0, 0.3), metadata={
      "help": "scales of the branch's last conv (1.0: He scale; 0.3: contractive)"})
  methods: tuple[str, ...] = dataclasses.field(default=METHODS, metadata={"help": f"of {METHODS}"})
  authors_steps: int = dataclasses.field(default=1000, metadata={"help": "Adam steps of the authors' solver"})
  seed: int = dataclasses.field(default=0, metadata={"help": "base seed"})

  def validate(self):
    bad = [m for m in self.methods if m not in METHODS]
    if bad:
      raise ValueError(f"unknown method(s) {bad}; expected some of {METHODS}")
    for name in ("size", "channels", "seeds", "images", "authors_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not self.gains or any(g <= 0 for g in self.gains):
      raise ValueError(f"--gains must be positive, got {self.gains}")


def load_block_weights(path: str, channels: int):
  """A paper block's torch-layout weights as the folded :class:`peel_jax.blocks.Block` params (HWIO kernels).

  Raises:
    H.BadConfig: a missing key or a mis-shaped array (named).
  """
  from peel_jax import port

  try:
    if str(path).endswith(".npz"):
      with np.load(path) as z:
        sd = {k: z[k] for k in z.files}
    else:
      sd = port.load_state_dict(path)
  except (OSError, ValueError, ImportError, port.PortError) as e:
    raise H.BadConfig(f"cannot read --weights {path!r}: {e}") from None
  want = {"conv1.weight": (channels, channels, 3, 3), "conv1.bias": (channels,),
          "conv2.weight": (channels, channels, 3, 3), "conv2.bias": (channels,)}
  missing = sorted(set(want) - set(sd))
  if missing:
    raise H.BadConfig(f"--weights {path!r} lacks {missing}; a paper block needs {sorted(want)}")
  for k, shape in want.items():
    if tuple(np.shape(sd[k])) != shape:
      raise H.BadConfig(f"--weights {path!r}: {k} has shape {tuple(np.shape(sd[k]))}, expected {shape}")
  conv = lambda w, b: {"kernel": np.transpose(np.asarray(sd[w], np.float32), (2, 3, 1, 0)),
                       "bias": np.asarray(sd[b], np.float32)}
  return (conv("conv1.weight", "conv1.bias"), conv("conv2.weight", "conv2.bias"))


def _problem(config: Config, images: np.ndarray, gain: float, seed: int, loaded):
  """``(block, x)`` for one seed: a paper block and the lifted inputs ``(N, size, size, channels)``."""
  import jax
  import jax.numpy as jnp

  from peel_jax import images as _images
  from peel_jax import zoo
  from peel_jax.blocks import Block

  k_block, k_lift = jax.random.split(jax.random.key(config.seed * 100003 + seed))
  block = zoo.random_block(k_block, "paper", config.channels, 1.0)
  if loaded is not None:
    block = block.with_params({**block.params, "convs": jax.tree.map(jnp.asarray, loaded)})
  convs = list(block.params["convs"])
  convs[-1] = jax.tree.map(lambda a: gain * a, convs[-1])
  block = Block({**block.params, "convs": tuple(convs)}, block.spec)
  w = jax.random.normal(k_lift, (3, 3, 3, config.channels)) * np.sqrt(2.0 / 27)
  x_img = jnp.asarray(_images.normalize(images))
  x = jax.nn.relu(jax.lax.conv_general_dilated(x_img, w, (1, 1), ((1, 1), (1, 1)),
                                               dimension_numbers=("NHWC", "HWIO", "NHWC")))
  return block, x


def _solve(method: str, block, y, key, config: Config):
  from peel_jax import invert_block
  from peel_jax.baselines import authors_penalty, fixed_point

  if method == "peel":
    return invert_block(block, y, key=key)
  if method == "authors":
    return authors_penalty(block, y, key=key, steps=config.authors_steps)
  return fixed_point(block, y)


def unit_id(gain: float, seed: int) -> str:
  return f"g{gain:g}_s{seed:03d}"


def run(config: Config, run: H.Run) -> dict:
  """Runs (or resumes) the study into ``run``; returns the summary."""
  import jax
  import jax.numpy as jnp

  from peel_jax import data, relative_error, relative_residual

  try:
    ds = data.load_images(config.data, size=config.size, limit=config.images * config.seeds)
  except (ValueError, OSError, ImportError) as e:
    raise H.BadConfig(f"cannot load --data {config.data!r}: {e}") from None
  if len(ds.images) < config.images:
    raise H.BadConfig(f"--data {config.data!r} has {len(ds.images)} images; --images asks for {config.images}")
  loaded = None if config.weights is None else load_block_weights(config.weights, config.channels)
  units = [(g, s) for g in config.gains for s in range(config.seeds)]
  ids = [unit_id(g, s) for g, s in units]
  todo = set(run.mine(ids))
  mesh = H.batch_mesh()
  for (gain, seed), uid in H.progress(zip(units, ids), len(units), "toy_block"):
    if uid not in todo:
      continue
    start = (seed * config.images) % (len(ds.images) - config.images + 1)
    idx = np.arange(start, start + config.images)
    block, x = _problem(config, ds.images[idx], gain, seed, loaded)
    y = block(x)
    ys, n = H.shard_batch(np.asarray(y), mesh)
    rows = []
    for method in config.methods:
      key = jax.random.key(seed)
      _solve(method, block, ys, key, config)  # compile (and warm) once per shape, not timed
      t0 = time.perf_counter()
      x_hat, info = _solve(method, block, ys, key, config)
      x_hat = jax.block_until_ready(x_hat)
      per_image = (time.perf_counter() - t0) / n
      x_hat = jnp.asarray(np.asarray(x_hat)[:n])
      err = np.asarray(relative_error(x_hat, x))
      res = np.asarray(relative_residual(block, x_hat, y))
      paper = 100.0 * np.sqrt(np.sum((np.asarray(x_hat) - np.asarray(x)) ** 2, axis=(1, 2, 3))) / x[0].size
      for i in range(n):
        rows.append({
            "gain": gain, "seed": seed, "method": method, "image": int(idx[i]), "name": ds.names[idx[i]],
            "block": "toy", "input_rel_error": float(err[i]), "residual": float(res[i]),
            "paper_metric_percent": float(paper[i]), "converged": bool(np.asarray(info.converged)[i]),
            "diverged": bool(np.asarray(info.diverged)[i]), "iterations": int(np.asarray(info.iterations)[i]),
            "seconds_per_image": per_image,
        })
    run.save(uid, rows)
  rows = run.collect(ids)
  summary = summarize(config, rows)
  if run.writer:
    H.write_csv(run.path("metrics.csv"), rows)
    H.write_json(run.path("summary.json"), summary)
    plot(run.path("errors.png"), config, rows)
  return summary


def summarize(config: Config, rows: list[dict]) -> dict:
  """Per (gain, method): the distribution over every image, and the mean and spread over seeds of the median."""
  out = {"claim": "paper (arXiv 2504.06410) toy: 1.14% recovery error, as 100 * ||x - x_hat|| / numel(x)",
         "groups": []}
  for gain in config.gains:
    for method in config.methods:
      sel = [r for r in rows if r["gain"] == gain and r["method"] == method]
      per_seed = [float(np.median([r["input_rel_error"] for r in sel if r["seed"] == s])) for s in
                  sorted({r["seed"] for r in sel})]
      out["groups"].append({
          "gain": gain, "method": method, "images": len(sel),
          "converged": int(sum(r["converged"] for r in sel)), "diverged": int(sum(r["diverged"] for r in sel)),
          "input_rel_error": H.describe([r["input_rel_error"] for r in sel]),
          "residual": H.describe([r["residual"] for r in sel]),
          "paper_metric_percent": H.describe([r["paper_metric_percent"] for r in sel]),
          "per_seed_median_error": {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)),
                                    "values": per_seed},
          "seconds_per_image": H.describe([r["seconds_per_image"] for r in sel]),
          "not_converged": [(r["seed"], r["image"]) for r in sel if not r["converged"]],
      })
  return out


def plot(path: str, config: Config, rows: list[dict]) -> None:
  """Relative input error and residual per image, by method and gain (log scale; a dot per image)."""
  fig = H.figure(4.2 * 2, 3.6)
  rng = np.random.default_rng(0)
  for k, metric in enumerate(("input_rel_error", "residual")):
    ax = fig.add_subplot(1, 2, k + 1)
    ticks = []
    for gi, gain in enumerate(config.gains):
      for mi, method in enumerate(config.methods):
        pos = gi * (len(config.methods) + 1) + mi
        v = np.maximum([r[metric] for r in rows if r["gain"] == gain and r["method"] == method], 1e-12)
        ax.scatter(pos + 0.15 * rng.standard_normal(len(v)), v, s=6, alpha=0.6)
        ax.plot([pos - 0.3, pos + 0.3], [np.median(v)] * 2, "k-")
        ticks.append((pos, f"{method}\ngain {gain:g}"))
    ax.set_yscale("log")
    ax.set_xticks([p for p, _ in ticks])
    ax.set_xticklabels([t for _, t in ticks], fontsize=6)
    ax.set_title(metric.replace("_", " "), fontsize=9)
  fig.suptitle(f"toy block: {config.channels} channels, {config.size}x{config.size}, {config.seeds} seeds x "
               f"{config.images} images", fontsize=9)
  fig.tight_layout()
  H.save_figure(fig, path)


def main(argv=None) -> int:
  return H.main(Config, run, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
  sys.exit(main())
