"""A short optax training run, so that a trained network exists offline (no pretrained weights can be downloaded).

The networks of :mod:`peel_jax.models` run BatchNorm in inference mode only (running statistics), as the attack
needs. Training here keeps the running statistics at their initial values (mean 0, variance 1), so every BatchNorm
is a learned per-channel affine map, and starts every residual branch at zero (the last BatchNorm's scale, or the
last convolution when there is no BatchNorm, is zeroed: the "zero-init residual" of Goyal et al. 2017, torchvision's
``zero_init_residual=True``), which keeps a normalisation-free ResNet trainable from the first step. The result is
a real trained classifier (its held-out accuracy is reported), though not one trained with batch statistics.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from experiments import _harness as H


def zero_init_residual(variables: dict) -> dict:
  """Zeroes the last BatchNorm scale (or, without BatchNorm, the last conv kernel and bias) of every branch."""
  from peel_jax.cli import scale_branches

  return scale_branches(variables, 0.0, bn_bias=False)


def train_classifier(model, variables, images: np.ndarray, labels: np.ndarray, *, key, steps: int = 300,
                     batch_size: int = 64, learning_rate: float = 1e-3, holdout: float = 0.2) -> tuple[dict, dict]:
  """Trains ``model``'s parameters (not its BatchNorm statistics) by Adam on softmax cross-entropy.

  Args:
    model: a :class:`peel_jax.models.ResNet` whose ``num_classes`` covers the labels.
    variables: its initial variables (zero-init residual is applied here).
    images: ``(N, H, W, 3)`` normalised float32 images; labels ``(N,)`` int.
    key: PRNG key (the hold-out split and the batches).
    steps, batch_size, learning_rate: the run.
    holdout: fraction of the images held out for the reported accuracy.

  Returns:
    ``(variables, stats)``: the trained variables and ``{'train_accuracy' (on at most 512 training images),
    'holdout_accuracy', 'final_loss', 'steps', 'train_images', 'holdout_images'}``.
  """
  import jax.numpy as jnp
  import optax

  variables = zero_init_residual(variables)
  n = len(images)
  k_split, k_batches = jax.random.split(key)
  perm = np.asarray(jax.random.permutation(k_split, n))
  n_hold = int(round(holdout * n))
  hold, train = perm[:n_hold], perm[n_hold:]
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}
  state = optax.adam(learning_rate).init(params)
  loss = np.nan
  for t in range(steps):
    idx = train[np.asarray(jax.random.randint(jax.random.fold_in(k_batches, t), (batch_size,), 0, len(train)))]
    params, state, loss = _step(model, learning_rate, params, rest, state, jnp.asarray(images[idx]),
                                jnp.asarray(labels[idx]))
  trained = {"params": params, **rest}
  stats = {"final_loss": float(loss), "steps": steps, "train_images": int(len(train)),
           "holdout_images": int(n_hold),
           "train_accuracy": accuracy(model, trained, images[train[:512]], labels[train[:512]]),
           "holdout_accuracy": accuracy(model, trained, images[hold], labels[hold]) if n_hold else None}
  return trained, stats


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(model, learning_rate: float, params, rest, state, x, y):
  """One Adam step on softmax cross-entropy (one compiled program per model and learning rate)."""
  import jax.numpy as jnp
  import optax

  def loss_fn(p):
    logits = model.apply({"params": p, **rest}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

  loss, g = jax.value_and_grad(loss_fn)(params)
  upd, state = optax.adam(learning_rate).update(g, state, params)
  return optax.apply_updates(params, upd), state, loss


def predict(model, variables, images: np.ndarray, chunk: int = 256) -> np.ndarray:
  """Logits ``(N, classes)``, in chunks."""
  return np.concatenate([np.asarray(_apply(model, variables, images[i:i + chunk]))
                         for i in range(0, len(images), chunk)])


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, x):
  return model.apply(variables, x)


def accuracy(model, variables, images: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(predict(model, variables, images), -1) == labels))


def cached_training(path: str, model, template: dict, train: functools.partial) -> tuple[dict, dict]:
  """``train()`` once: the trained variables are kept in ``path`` (flax msgpack, written atomically) with their
  stats beside them (``path + '.json'``), and loaded from there on a rerun."""
  import json

  from flax import serialization

  if os.path.exists(path) and os.path.exists(path + ".json"):
    with open(path, "rb") as f:
      variables = serialization.from_bytes(template, f.read())
    with open(path + ".json") as f:
      return variables, json.load(f)
  variables, stats = train()
  blob = serialization.to_bytes(variables)

  def w(tmp):
    with open(tmp, "wb") as f:
      f.write(blob)

  H.atomic_write(path, w)
  H.write_json(path + ".json", stats)
  return variables, stats
